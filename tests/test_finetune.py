"""pcam-train --init-from PACKAGE [--replay OLD]: fine-tuning starts from the parent's weights, mixes in
old patches, and records a lineage (the parent's sha256, the data seen) in the child's config.

All data is SYNTHETIC (PCam-layout HDF5 cut from wsi_toolkit's H&E-like textures; "old" and "new" from
other texture seeds), the models are tiny resnet18s at 32 px without ImageNet weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastai")
pytest.importorskip("h5py")

from patch_model.cli import train_main  # noqa: E402
from patch_model.data import open_splits, write_pcam_h5  # noqa: E402
from patch_model.finetune import ReplayMix, init_from_parent, read_parent  # noqa: E402
from patch_model.train import TrainConfig  # noqa: E402
from wsi_toolkit.errors import ConfigError  # noqa: E402
from wsi_toolkit.model_package import load_model_package  # noqa: E402
from wsi_toolkit.synthetic import _Texture  # noqa: E402

TINY = ["--arch", "resnet18", "--size", "32", "--no-pretrained", "--batch-size", "32", "--top-losses", "2",
        "--workers", "0", "--no-progress"]
N_TRAIN, N_VALID = 96, 32
WSINFER_SCHEMA = json.loads((Path(__file__).parent / "data" / "wsinfer_model_config.schema.json").read_text())


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (96, 96, 3) uint8 crops, half from the synthetic tumour texture (label 1), half normal."""
    tex = _Texture(seed, tile=256)
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(n):
        kind = "tumor" if i % 2 else "normal"
        t = tex.level_tile(kind, 4)
        y, x = rng.integers(0, t.shape[0] - 96, 2)
        out.append(t[y:y + 96, x:x + 96])
        labels.append(i % 2)
    return np.stack(out), np.asarray(labels, np.uint8)


def _pcam(root: Path, seed: int) -> Path:
    for k, (split, n) in enumerate({"train": N_TRAIN, "valid": N_VALID}.items()):
        write_pcam_h5(root, split, *_patches(n, seed + k))
    (root / "patches_summary.json").write_text(json.dumps({"synthetic": True, "split_by": "slide"}))
    return root


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> tuple[Path, Path]:
    """(old data, parent package) trained on the old data."""
    old = _pcam(tmp_path_factory.mktemp("old"), seed=40)
    out = tmp_path_factory.mktemp("parent") / "run"
    assert train_main(["--data", str(old), "--out", str(out), *TINY, "--epochs-frozen", "0", "--epochs", "1",
                       "--lr-find-iters", "0", "--lr-unfrozen", "1e-3"]) == 0
    return old, out / "model"


@pytest.fixture(scope="module")
def child(parent, tmp_path_factory):
    """Fine-tuned on new data with a quarter of the mix replayed, at a vanishing rate (1e-9) so that
    its weights must still be the parent's; --arch and --size left out (taken from the parent)."""
    old, parent_pkg = parent
    new = _pcam(tmp_path_factory.mktemp("new"), seed=60)
    out = tmp_path_factory.mktemp("child") / "run"
    rc = train_main(["--data", str(new), "--out", str(out), "--init-from", str(parent_pkg), "--replay", str(old),
                     "--replay-fraction", "0.25", "--batch-size", "32", "--top-losses", "2", "--workers", "0",
                     "--no-progress", "--epochs-frozen", "0", "--epochs", "1", "--lr-find-iters", "0",
                     "--lr-unfrozen", "1e-9"])
    assert rc == 0
    return new, out


def _params(package: Path) -> dict[str, torch.Tensor]:
    return dict(torch.jit.load(str(package / "torchscript_model.pt"), map_location="cpu").named_parameters())


def test_child_records_its_parent_and_the_data_it_saw(parent, child):
    old, parent_pkg = parent
    new, out = child
    lin = json.loads((out / "model" / "config.json").read_text())["wsi_toolkit"]["lineage"]
    assert lin["parent"]["sha256"] == hashlib.sha256((parent_pkg / "torchscript_model.pt").read_bytes()).hexdigest()
    assert lin["parent"]["path"] == str(parent_pkg.resolve())
    rows = {d["role"]: d for d in lin["data"]}
    assert rows["new"]["path"] == str(new.resolve()) and rows["new"]["n_patches"] == N_TRAIN
    assert rows["replay"]["path"] == str(old.resolve())
    n_old = rows["replay"]["n_patches"]
    assert abs(n_old / (N_TRAIN + n_old) - 0.25) < 0.01  # a quarter of the mix is old
    assert json.loads((out / "metrics.json").read_text())["splits"]["train"]["n"] == N_TRAIN + n_old


def test_child_package_is_a_valid_wsinfer_config(child):
    jsonschema = pytest.importorskip("jsonschema")
    _, out = child
    doc = json.loads((out / "model" / "config.json").read_text())
    jsonschema.Draft4Validator(WSINFER_SCHEMA).validate(doc)
    load_model_package(out / "model")  # our own schema, lineage included


def test_parent_package_has_a_lineage_without_parent(parent):
    old, parent_pkg = parent
    lin = json.loads((parent_pkg / "config.json").read_text())["wsi_toolkit"]["lineage"]
    assert lin["parent"] is None
    assert lin["data"] == [{"path": str(old.resolve()), "n_patches": N_TRAIN, "role": "new"}]


def test_child_starts_from_the_parents_weights(parent, child):
    """At lr 1e-9 the child's parameters stay the parent's; a fresh resnet18 is far from them."""
    _, parent_pkg = parent
    _, out = child
    p, c = _params(parent_pkg), _params(out / "model")
    assert p.keys() == c.keys()
    assert max(float((p[k] - c[k]).abs().max()) for k in p) < 1e-5
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False))  # resnet18's stem, fresh
    key = next(k for k in p if p[k].shape == fresh[0].weight.shape)
    assert float((p[key] - fresh[0].weight).abs().max()) > 1e-3


def test_init_from_another_architecture_names_the_package(parent, tmp_path, capsys):
    _, parent_pkg = parent
    rc = train_main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--init-from", str(parent_pkg),
                     "--arch", "resnet34", "--size", "32", "--epochs", "1", "--epochs-frozen", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(parent_pkg) in err and "--arch resnet18 --size 32" in err


def test_init_from_other_input_size_is_refused(parent, tmp_path, capsys):
    _, parent_pkg = parent
    rc = train_main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--init-from", str(parent_pkg),
                     "--size", "64", "--epochs", "1", "--epochs-frozen", "0"])
    assert rc == 2 and "resnet18 at 32 px" in capsys.readouterr().err


def test_weights_that_do_not_fit_are_refused_with_the_package_named(parent):
    _, parent_pkg = parent
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="do not fit") as e:
        init_from_parent(other, read_parent(parent_pkg))
    assert str(parent_pkg) in str(e.value)


def test_init_from_and_weights_contradict(parent, tmp_path):
    _, parent_pkg = parent
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    with pytest.raises(ConfigError, match="--init-from"):
        TrainConfig(data=tmp_path, out=tmp_path / "o", init_from=parent_pkg, weights=weights)


def test_replay_mix_appends_a_seeded_draw_of_the_old_patches(parent, child):
    old, _ = parent
    new, _ = child
    new_train, old_train = open_splits(new)["train"], open_splits(old)["train"]
    a = ReplayMix(new_train, old_train, 10, seed=3)
    b = ReplayMix(new_train, old_train, 10, seed=3)
    assert len(a) == N_TRAIN + 10 and np.array_equal(a.old_index, b.old_index)
    assert len(set(a.old_index.tolist())) == 10
    j = int(a.old_index[4])
    assert np.array_equal(a[N_TRAIN + 4][0], old_train[j][0]) and a.labels[N_TRAIN + 4] == old_train.labels[j]
    assert np.array_equal(a[5][0], new_train[5][0])


@pytest.mark.parametrize(("lin", "needle"), [
    ({"parent": {"sha256": "abc"}, "data": []}, "lineage.parent.sha256"),
    ({"parent": None, "data": [{"path": "d", "n_patches": 3, "role": "old"}]}, "lineage.data[0].role"),
    ({"parent": None}, "lineage"),
])
def test_config_schema_checks_the_lineage(lin, needle):
    from wsi_toolkit.model_package import ModelConfig, ModelPackageError, pcam_config

    doc = pcam_config(input_size=32).to_dict()
    doc["wsi_toolkit"]["lineage"] = lin
    with pytest.raises(ModelPackageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig.from_dict(doc)
