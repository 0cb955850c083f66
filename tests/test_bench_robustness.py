"""scripts/bench_robustness.py end to end on a tiny SYNTHETIC Kaggle-layout set with the SYNTHETIC
colour-rule package (P(tumour) > 0.5 exactly when the centre third's mean green is below 0.52).

The patches are built so that the rule's answer under a brightness change is known in advance:
"tumour-looking" patches have centre green 0.44..0.46 (x 1.2 -> above 0.52: they flip; x 1.1 does
not), "normal-looking" ones 0.60..0.63 (x 0.8 -> below 0.52: they flip; x 0.9 does not); a few
normal-looking patches carry label 1, so the clean accuracy is not 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastai")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_robustness.py"
N = 60
FAMILIES = {"jpeg": 4, "blur": 4, "resample": 4, "hed": 3, "brightness": 4, "contrast": 4, "combined": 1}


def _patch(rng: np.random.Generator, green: int) -> np.ndarray:
    """(96, 96, 3) uint8: red ~180, green ~``green``, blue ~190, each +-20 of grain (below 212, so
    +20 % brightness never clips)."""
    base = np.array([180, green, 190], np.float64)
    return np.clip(base + rng.uniform(-20, 20, (96, 96, 3)), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory):
    """(Kaggle folder, per-patch tumour-looking flags, labels) in id order."""
    import tifffile

    root = tmp_path_factory.mktemp("robust_kaggle")
    (root / "train").mkdir()
    rng = np.random.default_rng(5)
    rows, looks, labels = ["id,label"], [], []
    for i in range(N):
        tumour_looking = i % 2 == 0
        green = int(rng.integers(113, 118)) if tumour_looking else int(rng.integers(154, 160))
        label = int(tumour_looking or i % 10 == 1)  # patches 1, 11, 21, ...: normal-looking, labelled tumour
        pid = f"{i:040x}"
        tifffile.imwrite(root / "train" / f"{pid}.tif", _patch(rng, green), photometric="rgb")
        rows.append(f"{pid},{label}")
        looks.append(tumour_looking)
        labels.append(label)
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return root, np.array(looks), np.array(labels)


def _run(package, data, out, *extra):
    cmd = [sys.executable, str(SCRIPT), str(package), "--data", str(data), "--out", str(out),
           "--splits", "train", "valid", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "robustness.json").read_text())


@pytest.fixture(scope="module")
def suite(model_dir, colour_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust_out")
    return _run(model_dir, colour_set[0], out), out


def _row(record, family, strength):
    return next(r for r in record["rows"] if r["family"] == family and r["strength"] == strength)


def test_suite_writes_json_table_and_plot_for_every_family(suite):
    from PIL import Image

    record, out = suite
    assert record["n_patches"] == N and record["synthetic"] is True and record["leaky"] is True
    fams = [r["family"] for r in record["rows"]]
    assert fams[0] == "clean"
    assert {f: fams.count(f) for f in FAMILIES} == FAMILIES
    md = (out / "robustness.md").read_text()
    assert md.count("\n| ") == 1 + sum(FAMILIES.values())  # header + clean + one line per perturbation
    with Image.open(out / "robustness.png") as im:
        assert im.size[0] > 400 and im.size[1] > 200


def test_clean_row_is_the_rule_against_the_labels(suite, colour_set):
    record, _ = suite
    _, looks, labels = colour_set
    clean = record["rows"][0]
    assert clean["accuracy"] == pytest.approx(np.mean(looks.astype(int) == labels), abs=1e-4)  # 54 of 60
    assert clean["flips_vs_direct"] == 0 and clean["mean_abs_dp_vs_direct"] == 0


def test_brightness_flips_exactly_the_patches_it_pushes_over_the_threshold(suite, colour_set):
    record, _ = suite
    _, looks, labels = colour_set
    n_tumour_looking, n_normal_looking = int(looks.sum()), int((~looks).sum())
    assert _row(record, "brightness", "+20%")["flips_vs_direct"] == n_tumour_looking
    assert _row(record, "brightness", "-20%")["flips_vs_direct"] == n_normal_looking
    for s in ("+10%", "-10%"):
        r = _row(record, "brightness", s)
        assert r["flips_vs_direct"] == 0 and r["mean_abs_dp_vs_direct"] > 0
    # +20 %: everything reads normal, so accuracy is the share of label-0 patches
    up = _row(record, "brightness", "+20%")
    assert up["accuracy"] == pytest.approx(np.mean(labels == 0), abs=1e-4)
    assert up["moved_gt_0.2"] >= n_tumour_looking
    assert up["accuracy_change_points"] == pytest.approx(100 * (up["accuracy"] - record["rows"][0]["accuracy"]),
                                                         abs=0.01)


def test_blur_moves_probabilities_without_flipping_flat_patches(suite):
    """Blur keeps local means: on patches of one colour plus grain the rule barely moves."""
    record, _ = suite
    for r in (r for r in record["rows"] if r["family"] == "blur"):
        assert r["flips_vs_direct"] == 0
        assert 0 < r["mean_abs_dp_vs_direct"] < 0.05


def test_hed_rows_repeat_under_the_seed_and_change_with_it(suite, model_dir, colour_set, tmp_path):
    record, _ = suite
    again = _run(model_dir, colour_set[0], tmp_path / "a", "--families", "hed")
    other = _run(model_dir, colour_set[0], tmp_path / "b", "--families", "hed", "--seed", "1")
    hed = [r for r in record["rows"] if r["family"] == "hed"]
    assert [r for r in again["rows"] if r["family"] == "hed"] == hed
    assert [r["mean_abs_dp_vs_direct"] for r in other["rows"] if r["family"] == "hed"] != \
        [r["mean_abs_dp_vs_direct"] for r in hed]


@pytest.mark.slow
def test_slide_path_runs_the_mosaic_through_wsi_infer(model_dir, colour_set, tmp_path):
    """--slide-path: the patches as a 40x JPEG Q=85 SVS mosaic through wsi-infer; every patch is found
    on the slide, and the patch-level emulation of that path (``combined``: the same resampling,
    then JPEG Q=85) moves the rule's answers as little as the slide does."""
    record = _run(model_dir, colour_set[0], tmp_path / "s", "--families", "combined", "--slide-path")
    slide = next(r for r in record["rows"] if r["family"] == "slide")
    combined = next(r for r in record["rows"] if r["family"] == "combined")
    assert slide["returncode"] == 0 and slide["n_scored"] == N and slide["n_missing"] == 0
    assert slide["flips_vs_direct"] == combined["flips_vs_direct"]
    assert abs(slide["mean_abs_dp_vs_direct"] - combined["mean_abs_dp_vs_direct"]) < 0.002


def _result(path: Path, package: str, rows: list[tuple[str, str, float, int]], *, seed: int = 0) -> Path:
    """A bench_robustness.py result with the given (family, strength, accuracy, flips) rows; the first is clean."""
    clean = rows[0][2]
    record = {"package": package, "data": "/d", "splits": ["test"], "seed": seed, "n_patches": 10,
              "rows": [{"family": f, "strength": s, "accuracy": a, "roc_auc": 0.9, "flips_vs_direct": n,
                        "accuracy_change_points": round(100 * (a - clean), 2)} for f, s, a, n in rows]}
    path.write_text(json.dumps(record))
    return path


def test_compare_robustness_puts_each_row_side_by_side(tmp_path):
    base = _result(tmp_path / "a.json", "/p/base", [("clean", "-", 0.9, 0), ("jpeg", "Q=70", 0.85, 5),
                                                      ("blur", "sigma 1 px", 0.6, 30)])
    after = _result(tmp_path / "b.json", "/p/robust", [("clean", "-", 0.88, 0), ("jpeg", "Q=70", 0.87, 2),
                                                         ("blur", "sigma 1 px", 0.86, 3)])
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_robustness.py"),
                          str(base), str(after), "--names", "before", "after"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    blur = next(line for line in out.stdout.splitlines() if line.startswith("| blur |"))
    assert "0.6000 (-30.00)" in blur and "0.8600 (-2.00)" in blur and "| 30 |" in blur
    assert "before: -30.00, after: -2.00" in out.stdout  # the worst moderate-strength change of each


def test_compare_robustness_refuses_results_on_other_patches(tmp_path):
    a = _result(tmp_path / "a.json", "/p/a", [("clean", "-", 0.9, 0)])
    b = _result(tmp_path / "b.json", "/p/b", [("clean", "-", 0.9, 0)], seed=1)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_robustness.py"),
                          str(a), str(b)], capture_output=True, text=True)
    assert out.returncode != 0 and "not on the same patches" in out.stderr
