"""scripts/bench_active.py: the active-learning simulation, end to end on a tiny SYNTHETIC Kaggle-layout
set (the ImageNet EfficientNet-Lite0 body from the installed wheel; skipped without it), and its
selection rules on literal arrays."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_active.py"
sys.path.insert(0, str(SCRIPT.parent))
import bench_active as ba  # noqa: E402


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """120 SYNTHETIC patches: tumour texture (label 1) and normal texture (label 0), a few labels flipped."""
    import tifffile

    from wsi_toolkit.synthetic import _Texture

    root = tmp_path_factory.mktemp("active_kaggle")
    (root / "train").mkdir()
    tex = _Texture(7, tile=256)
    tiles = {1: tex.level_tile("tumor", 4), 0: tex.level_tile("normal", 4)}
    rng = np.random.default_rng(7)
    rows = ["id,label"]
    for i in range(120):
        looks = i % 2
        y, x = rng.integers(0, tiles[looks].shape[0] - 96, 2)
        pid = f"{i:040x}"
        tifffile.imwrite(root / "train" / f"{pid}.tif", tiles[looks][y:y + 96, x:x + 96], photometric="rgb")
        rows.append(f"{pid},{looks if i % 17 else 1 - looks}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow  # two runs of the script: ~25 s of CPU
def test_bench_active_writes_curves_table_and_plot(kaggle, tmp_path, lite0_weights):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--data", str(kaggle), "--out", str(out), "--size", "64", "--start", "10",
           "--per-round", "10", "--max-labels", "30", "--seeds", "0", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "active.json").read_text())
    assert set(doc["curves"]) == {"uncertainty", "random", "diversity"}
    for strategy, rows in doc["curves"].items():
        assert [r["labels"] for r in rows] == [10, 20, 30], strategy
        assert all(0.0 <= r["auc_min"] <= r["auc_mean"] <= r["auc_max"] <= 1.0 for r in rows)
    # every strategy starts from the same labelled pool, so their first scores agree
    firsts = {s: rows[0]["auc_mean"] for s, rows in doc["curves"].items()}
    assert len(set(firsts.values())) == 1
    assert doc["meta"]["leaky"] is True and doc["meta"]["pool_n"] == 96 and doc["meta"]["held_out_n"] == 12
    assert doc["full_pool"]["labels"] == 96
    assert doc["meta"]["C_choice"]["valid_auc"].keys() == {"0.001", "0.003", "0.01", "0.03", "0.1"}
    assert (out / "active_learning.png").stat().st_size > 1000
    assert "LEAKY" in (out / "active.md").read_text()
    # a second run reads the cached features instead of recomputing them
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0 and "features from" in again.stdout


@pytest.mark.slow  # pcam-train twice per strategy
def test_bench_active_finetune_mode_chains_packages(kaggle, tmp_path, lite0_weights):
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--data", str(kaggle), "--out", str(out), "--mode", "finetune", "--size", "64",
           "--start", "40", "--per-round", "20", "--max-labels", "60", "--seeds", "0", "--pool-sample", "30",
           "--strategies", "uncertainty"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "active_finetune.json").read_text())
    assert set(doc["curves"]) == {"uncertainty"}
    for rows in doc["runs"].values():
        first, second = rows["0"]
        assert [first["labels"], second["labels"]] == [40, 60]
        cfg = json.loads((Path(second["package"]) / "config.json").read_text())["wsi_toolkit"]
        parent_pt = Path(first["package"]) / "torchscript_model.pt"
        assert cfg["lineage"]["parent"]["sha256"] == hashlib.sha256(parent_pt.read_bytes()).hexdigest()
        assert cfg["lineage"]["data"][0]["n_patches"] == 60


def test_k_center_picks_the_farthest_points():
    x = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0], [9, 0]])
    assert ba.k_center(x, np.array([0]), 2).tolist() == [3, 2]


def test_uncertainty_picks_the_probabilities_nearest_one_half():
    class Stub:
        def p_tumor(self, x):
            return x[:, 0]

    x = np.array([[0.1], [0.45], [0.9], [0.55], [0.5], [0.7]])
    got = ba.choose("uncertainty", 2, head=Stub(), pool_x=x, pool_z=x, labelled=np.array([4]),
                    rng=np.random.default_rng(0))
    assert sorted(got.tolist()) == [1, 3]


def test_initial_pool_holds_both_classes():
    y = np.array([0] * 50 + [1])
    for seed in range(5):
        pick = ba.initial_pool(y, 3, np.random.default_rng(seed))
        assert len(set(pick.tolist())) == 3 and set(y[pick].tolist()) == {0, 1}


def test_labels_to_reach_is_the_first_count_at_the_target():
    assert ba.labels_to_reach({10: 0.5, 20: 0.8, 30: 0.7, 40: 0.9}, 0.75) == 20
    assert ba.labels_to_reach({10: 0.5}, 0.75) is None
