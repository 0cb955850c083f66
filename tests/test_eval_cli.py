"""wsi-eval end to end: SYNTHETIC slides -> wsi-infer (SYNTHETIC colour-rule model) -> wsi-eval.

The truth is the slides' own geometry: two tumour slides (three tumours larger than the ITC
limit, one tiny tumour that is an isolated-tumour-cell region) and two normal slides (one with an
empty annotation file, one with none).
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import shapely
import tifffile

from wsi_toolkit.cli.eval import main as eval_main
from wsi_toolkit.cli.infer import main as infer_main
from wsi_toolkit.evaluate import read_detections_csv
from wsi_toolkit.synthetic import Blob, SyntheticSpec, make_spec, write_synthetic_slide
from wsi_toolkit.synthetic_model import make_colour_rule_package

MPP = 0.243

# Tumour radii 220..350 um: 440+ um across, far above the 200 um ITC size. The 40 um one is an ITC
# (80 um across + 75 um dilation = ~155 um < 275 um).
TUMOR_1 = SyntheticSpec(
    size_um=(3000.0, 2200.0),
    tissue=(Blob((1500.0, 1100.0), (1250.0, 850.0), angle_deg=5, wobble=0.1, lobes=5, phase=0.3),),
    tumors=(Blob((1000.0, 1000.0), (300.0, 240.0), angle_deg=20, wobble=0.15, lobes=4, phase=1.0),
             Blob((2050.0, 1250.0), (260.0, 220.0), angle_deg=70, wobble=0.15, lobes=4, phase=2.0),
             Blob((1700.0, 550.0), (40.0, 35.0), wobble=0.05, lobes=3, phase=0.0)),
    seed=21,
)
TUMOR_2 = SyntheticSpec(
    size_um=(2600.0, 2000.0),
    tissue=(Blob((1300.0, 1000.0), (1050.0, 780.0), angle_deg=-10, wobble=0.1, lobes=5, phase=0.7),),
    tumors=(Blob((1200.0, 950.0), (350.0, 280.0), angle_deg=30, wobble=0.15, lobes=4, phase=1.5),),
    seed=22,
)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_e2e")
    slides, ann = root / "slides", root / "annotations"
    slides.mkdir()
    ann.mkdir()
    truth = {}
    for name, spec, xml in [
        ("tumor_001", TUMOR_1, True),
        ("tumor_002", TUMOR_2, True),
        ("normal_001", make_spec(tissue_mm2=1.0, n_tumors=0, seed=5), True),   # empty annotation file
        ("normal_002", make_spec(tissue_mm2=1.0, n_tumors=0, seed=6), False),  # no annotation file
    ]:
        s = write_synthetic_slide(slides / f"{name}.tif", spec, mpp=MPP, tile=256, xml=xml)
        if xml:
            shutil.move(str(s.xml_path), ann / f"{name}.xml")
        truth[name] = s
    model = root / "model"
    make_colour_rule_package(model, input_size=96)
    out = root / "out"
    assert infer_main([str(slides), "--model", str(model), "--out", str(out), "--workers", "0", "--no-progress"]) == 0
    return {"root": root, "out": out, "ann": ann, "truth": truth}


@pytest.fixture(scope="module")
def eval_run(evaluated):
    evaluation = evaluated["root"] / "eval"
    rc = eval_main(["--results", str(evaluated["out"]), "--annotations", str(evaluated["ann"]),
                    "--out", str(evaluation)])
    return rc, evaluation


def test_metrics_of_synthetic_slides(eval_run):
    rc, evaluation = eval_run
    assert rc == 0
    m = json.loads((evaluation / "metrics.json").read_text())
    assert m["slide_auc"] == 1.0
    assert m["froc"] >= 0.8
    assert set(m["sensitivities"]) == {"0.25", "0.5", "1", "2", "4", "8"}
    assert m["froc"] == pytest.approx(np.mean(list(m["sensitivities"].values())))
    assert (m["n_slides"], m["n_tumor_slides"]) == (4, 2)
    assert (m["n_lesions"], m["n_itc_excluded"]) == (3, 1)  # from the specs above
    assert m["synthetic"] is True


def test_per_slide_table(eval_run):
    _, evaluation = eval_run
    with open(evaluation / "slides.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"tumor_001", "tumor_002", "normal_001", "normal_002"}
    assert [rows[s]["truth"] for s in sorted(rows)] == ["normal", "normal", "tumor", "tumor"]
    assert rows["normal_002"]["annotation"] == ""
    assert (rows["tumor_001"]["n_lesions"], rows["tumor_002"]["n_lesions"]) == ("2", "1")
    found = sum(int(r["lesions_found"]) for r in rows.values())
    missed = sum(int(r["lesions_missed"]) for r in rows.values())
    assert (found, missed) == (3, 0)
    assert min(float(rows[s]["score"]) for s in ("tumor_001", "tumor_002")) > max(
        float(rows[s]["score"]) for s in ("normal_001", "normal_002"))


def test_detections_lie_on_the_true_tumors(evaluated, eval_run):
    _, evaluation = eval_run
    for name, slide in evaluated["truth"].items():
        det = read_detections_csv(evaluation / "detections" / f"{name}.csv")
        if slide.tumor_l0.is_empty:
            continue
        assert len(det) >= 1
        # Independent of the evaluation mask: the distance from the truth polygon, in um.
        dist_um = np.array([slide.tumor_l0.distance(shapely.Point(x, y)) for _, x, y in det]) * MPP
        assert dist_um.max() < 37.5, dist_um.max()


def test_plots_and_curve_written(eval_run):
    _, evaluation = eval_run
    for name in ("froc.png", "roc.png"):
        assert (evaluation / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(evaluation / "froc.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert curve[-1]["threshold"] == "" and float(curve[-1]["sensitivity"]) == 0.0
    assert not list(evaluation.glob(".*partial*"))


def test_summary_printed(evaluated, tmp_path, capsys):
    assert eval_main(["--results", str(evaluated["out"]), "--annotations", str(evaluated["ann"]),
                      "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "FROC" in printed and "slide AUC 1.000" in printed and "3 lesions (1 ITC excluded)" in printed


def test_written_csvs_evaluate_the_same(evaluated, eval_run, tmp_path):
    _, evaluation = eval_run
    assert eval_main(["--results", str(evaluation / "detections"), "--annotations", str(evaluated["ann"]),
                      "--out", str(tmp_path), "--mpp", str(MPP)]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((evaluation / "metrics.json").read_text())
    for key in ("froc", "sensitivities", "n_lesions", "n_itc_excluded", "n_false_positives", "slide_auc"):
        assert again[key] == first[key], key


# --------------------------------------------------------------------------------------------
# Detection CSVs + mask TIFFs (no inference)
# --------------------------------------------------------------------------------------------


def test_detection_csvs_against_mask_tiffs(tmp_path):
    results, ann = tmp_path / "results", tmp_path / "ann"
    results.mkdir()
    ann.mkdir()
    mask = np.zeros((3072, 4096), np.uint8)
    mask[512:1536, 1024:2048] = 255  # tumour, 1024 px = 256 um at 0.25 um/px: a lesion, not an ITC
    with tifffile.TiffWriter(ann / "a_mask.tif") as tw:
        for i, level in enumerate([mask, mask[::2, ::2], mask[::4, ::4]]):
            tw.write(level, tile=(256, 256), photometric="minisblack", compression="zlib",
                     subfiletype=0 if i == 0 else 1, metadata=None)
    # An RGB <stem>.tif in the annotation folder is a slide, not a mask: b stays normal.
    tifffile.imwrite(ann / "b.tif", np.full((64, 64, 3), 200, np.uint8), photometric="rgb")
    (results / "a.csv").write_text("0.4,1500,1000\n0.9,3500,2500\n")  # hit 0.4, false positive 0.9
    (results / "b.csv").write_text("0.3,100,100\n")                    # false positive 0.3
    (results / "summary.csv").write_text("slide,status\n")             # wsi-infer's table: not a slide
    assert eval_main(["--results", str(results), "--annotations", str(ann), "--out", str(tmp_path / "e"),
                      "--mpp", "0.25"]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    # Thresholds 0.3, 0.4, 0.9 over 2 slides, 1 lesion: (1 FP/slide, 1), (0.5, 1), (0.5, 0), (0, 0).
    # Increasing FPs: fps [0, .5, .5, 1], sens [0, 0, 1, 1]: 1/4 -> 0; 1/2 -> first at 0.5 -> 0;
    # 1, 2, 4, 8 -> 1. FROC = 4/6. Slide scores (max detection): a 0.9 > b 0.3 -> AUC 1.
    assert m["sensitivities"] == {"0.25": 0.0, "0.5": 0.0, "1": 1.0, "2": 1.0, "4": 1.0, "8": 1.0}
    assert m["froc"] == pytest.approx(4 / 6)
    assert m["slide_auc"] == 1.0
    assert (m["n_slides"], m["n_tumor_slides"], m["n_lesions"], m["n_itc_excluded"]) == (2, 1, 1, 0)
    with open(tmp_path / "e" / "slides.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["b"]["truth"] == "normal" and rows["b"]["annotation"] == ""
    assert rows["a"]["annotation"] == "a_mask.tif"


def test_errors_exit_2(tmp_path, capsys):
    (tmp_path / "ann").mkdir()
    assert eval_main(["--results", str(tmp_path / "missing"), "--annotations", str(tmp_path / "ann")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert eval_main(["--results", str(tmp_path / "empty"), "--annotations", str(tmp_path / "ann")]) == 2
    assert eval_main(["--help"]) == 0


def test_slides_csv_guards_formula_names(tmp_path):
    # a slide named like a spreadsheet formula is text in slides.csv (as in wsi-infer's summary.csv)
    results, ann = tmp_path / "results", tmp_path / "ann"
    results.mkdir()
    ann.mkdir()
    (results / "=cmd.csv").write_text("0.3,100,100\n")
    (results / "plain.csv").write_text("0.6,100,100\n")
    assert eval_main(["--results", str(results), "--annotations", str(ann), "--out", str(tmp_path / "e"),
                      "--mpp", "0.25"]) == 0
    text = (tmp_path / "e" / "slides.csv").read_text(encoding="utf-8")
    with open(tmp_path / "e" / "slides.csv", newline="", encoding="utf-8") as f:
        slides = [r["slide"] for r in csv.DictReader(f)]
    assert sorted(slides) == ["'=cmd", "plain"]
    assert "\n=" not in text and ",=" not in text
