"""``pcam-train`` under ``torchrun --nproc_per_node 2``: DistributedDataParallel on the CPU (gloo).

Two processes train resnet18 at 96 px for one frozen and one unfrozen epoch on a tiny SYNTHETIC
PCam-layout set (~20 s on two cores). Checked: both ranks hold the same weights after every epoch
and at the end (each rank logs a sha256 of its weights), only rank 0 writes outputs, and the
exported package loads and predicts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastai")
pytest.importorskip("h5py")
if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
    pytest.skip("torchrun (torch's launcher) is not installed", allow_module_level=True)
try:
    import accelerate  # noqa: F401  (fastai's DDP goes through it)
except ImportError:
    pytest.skip("multi-process training needs accelerate (pip install accelerate)", allow_module_level=True)

from patch_model.data import write_pcam_h5  # noqa: E402
from wsi_toolkit.model_package import load_model_package  # noqa: E402
from wsi_toolkit.synthetic import _Texture  # noqa: E402


def _patches(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` SYNTHETIC (96, 96, 3) crops, half cut from the tumour texture (label 1), shuffled."""
    tex = _Texture(seed, tile=512)
    rng = np.random.default_rng(seed)
    out = np.empty((n, 96, 96, 3), np.uint8)
    labels = np.r_[np.ones(n // 2), np.zeros(n - n // 2)].astype(np.uint8)
    for i, label in enumerate(labels):
        img = tex.level_tile("tumor" if label else "normal", 4)
        y, x = rng.integers(0, img.shape[0] - 96, 2)
        out[i] = img[y:y + 96, x:x + 96]
    order = rng.permutation(n)
    return out[order], labels[order]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = root / "data"
    for k, (split, n) in enumerate({"train": 128, "valid": 32}.items()):
        write_pcam_h5(data, split, *_patches(n, seed=10 + k))
    (data / "patches_summary.json").write_text(json.dumps({"synthetic": True, "split_by": "slide"}))
    out = root / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "patch_model.cli", "train", "--data", str(data), "--out", str(out), "--arch", "resnet18",
           "--size", "96", "--epochs-frozen", "1", "--epochs", "1", "--no-pretrained", "--batch-size", "32",
           "--lr", "1e-3", "--lr-unfrozen", "1e-4", "--workers", "0", "--no-progress", "-v"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    return proc, out


def _digests(text: str, what: str) -> dict[int, list[str]]:
    """{rank: [sha256, ...]} of the ``rank R of 2, epoch E: weights sha256 H`` (what="epoch") or
    ``rank R of 2: final model sha256 H`` (what="final") log lines."""
    pattern = (r"rank (\d) of 2, epoch \d+: weights sha256 ([0-9a-f]{64})" if what == "epoch"
               else r"rank (\d) of 2: final model sha256 ([0-9a-f]{64})")
    found: dict[int, list[str]] = {}
    for rank, digest in re.findall(pattern, text):
        found.setdefault(int(rank), []).append(digest)
    return found


def test_two_ranks_train_the_same_model(ddp_run):
    proc, _ = ddp_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    epochs = _digests(proc.stderr, "epoch")
    assert sorted(epochs) == [0, 1]                     # both processes trained
    assert len(epochs[0]) == 2 and epochs[0] == epochs[1]  # frozen + unfrozen epoch, same weights on both
    assert epochs[0][0] != epochs[0][1]                 # and the weights did change between the epochs
    final = _digests(proc.stderr, "final")
    assert len(final[0]) == len(final[1]) == 1 and final[0] == final[1]


def test_only_rank_0_writes_outputs(ddp_run):
    proc, out = ddp_run
    assert proc.returncode == 0
    assert proc.stdout.count("model package:") == 1      # one rank reports
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"metrics.json", "settings.json", "train.log", "model/config.json",
            "model/torchscript_model.pt", "checkpoints/best.pth"} <= names
    assert not [n for n in names if ".partial" in n or n.endswith(".tmp")]
    log = (out / "train.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log  # rank 1 logs to stderr only
    settings = json.loads((out / "settings.json").read_text())
    assert settings["resolved"]["world_size"] == 2 and settings["resolved"]["device"] == "cpu"
    assert settings["resolved"]["lr_find_iters"] == 0     # lr_find is not run under DDP


def test_exported_package_loads_and_predicts(ddp_run):
    proc, out = ddp_run
    assert proc.returncode == 0
    pkg = load_model_package(out / "model")
    import torch

    x, _ = _patches(8, seed=99)
    probs = pkg.predict_class_proba(torch.from_numpy(x)).numpy()
    assert probs.shape == (8, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["export_parity_max_abs_diff"] <= 1e-4
