"""Reading a results folder back gives what was written: the viewer's heatmap is the stitched one, and a
CSV cell guarded against spreadsheet formulas reads back as the original string (issue 30)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsi_toolkit.analysis import RunConfig, analyse_slide, write_outputs
from wsi_toolkit.export import csv_text, csv_untext, read_heatmap_tiff
from wsi_toolkit.heatmap import paint_cells, stitch
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.pipeline import run_batch
from wsi_toolkit.records import RunRecord
from wsi_toolkit.tiling import GridConfig, make_grid
from wsi_toolkit.view.catalogue import Catalogue, read_results_heatmap

_INF = InferenceConfig(device="cpu", runtime="torch", progress=False, workers=0)


@pytest.mark.parametrize(("merge", "stride"), [("mean", 32), ("mean", 40), ("mean", 48), ("mean", 96),
                                               ("centre", 32)])
def test_viewer_heatmap_is_the_stitched_heatmap(synthetic_slides, model_dir, tmp_path, merge, stride):
    # stride 40: patch / (2 * stride) = 1.2 paints offsets -1..1; 48: -1..0; 96: the own cell only
    slide = synthetic_slides(mpp=0.243)
    analysis = analyse_slide(slide.path, model_dir, RunConfig(merge=merge, stride_px=stride, inference=_INF))
    write_outputs(analysis, tmp_path)
    shown = read_results_heatmap(tmp_path, RunRecord.read(tmp_path / "run.json"))
    assert shown.shape_rc == analysis.heatmap.shape_rc
    np.testing.assert_array_equal(shown.predicted, analysis.heatmap.predicted)
    tif = read_heatmap_tiff(tmp_path / "heatmap.tif")  # the file's values, where the viewer paints them
    np.testing.assert_array_equal(shown.prob, tif.prob)
    np.testing.assert_array_equal(shown.prob[~shown.predicted], 0)
    np.testing.assert_allclose(shown.prob, np.rint(analysis.heatmap.prob * 255) / 255, atol=1e-6)
    if merge == "mean" and stride < 96:  # a mean-merge run predicts cells that are not kept grid cells
        own = np.zeros(shown.shape_rc, bool)
        own[analysis.grid.grid_rc[:, 0], analysis.grid.grid_rc[:, 1]] = True
        assert (shown.predicted & ~own).any()


def test_paint_cells_is_what_stitch_averages():
    grid = make_grid(l0_size=(2048, 1536), l0_mpp=0.243, config=GridConfig(stride_px=40))
    probs = np.linspace(0, 1, len(grid))
    total, count = paint_cells(grid.grid_rc, probs, grid.shape_rc, merge="mean", patch_px=96, stride_px=40)
    hm = stitch(grid, probs, merge="mean")
    np.testing.assert_array_equal(hm.predicted, count > 0)
    np.testing.assert_allclose(hm.prob[count > 0], (total / np.maximum(count, 1))[count > 0], atol=1e-7)
    assert count.max() == 9  # 3 x 3 patches over an inner cell


@pytest.mark.parametrize("value", ["=cmd.tif", "+1", "-x", "@SUM(A1)", "\tx", "\rx", "'=already", "plain.tif",
                                   "'quoted", "", "a=b"])
def test_csv_untext_undoes_csv_text(value):
    assert csv_untext(csv_text(value)) == value


@pytest.mark.parametrize("name", ["=cmd.tif", "'=quoted.tif"])
def test_viewer_lists_a_formula_named_slide_by_its_name(synthetic_slides, model_dir, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # a relative slide path: summary.csv's cell starts with the name
    shutil.copyfile(synthetic_slides(mpp=0.243).path, tmp_path / name)
    out = tmp_path / "out"
    run_batch([Path(name)], model_dir, out, RunConfig(inference=_INF))
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        assert next(csv.DictReader(fh))["slide"] == "'" + name  # guarded on disk
    catalogue = Catalogue.from_results(out)
    (entry,) = catalogue.entries
    assert entry.name == name and entry.status == "ok" and entry.results_dir is not None
