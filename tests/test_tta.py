"""Test-time augmentation at slide scale (wsi-infer --tta) and the uncertainty map it makes.

The colour-rule model is rotation-invariant, so these tests use a small model that is not
(``asym_model_dir`` in conftest.py: a strided convolution whose features are weighted by ramps
across the patch, so a flip or rotation changes its output). References are computed by rotating
the patches with numpy and running the package's model on each view, independently of the TTA code.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch

from wsi_toolkit.cli.infer import main
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.export import UNCERTAINTY_TIFF_CONTENT, read_heatmap_tiff, render_overlay
from wsi_toolkit.heatmap import Heatmap, uncertainty_summary
from wsi_toolkit.inference import InferenceConfig, make_views, run_inference
from wsi_toolkit.model_package import Preprocess, load_model_package
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic import ALIGNMENT_SPEC, write_synthetic_slide
from wsi_toolkit.tiling import GridConfig, make_grid
from wsi_toolkit.tissue import detect_tissue


@pytest.fixture(scope="module")
def align_slide(tmp_path_factory):
    # level 0 at 0.243 um/px: level 2 is the model's 0.972 um/px, read pixel-exactly
    return write_synthetic_slide(tmp_path_factory.mktemp("tta") / "tta_slide.tif", ALIGNMENT_SPEC, mpp=0.243,
                                 tile=256)


def _numpy_views(patch: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of one (p, p, 3) patch, made with numpy: rows are axis 0, columns axis 1."""
    if mode == "flips":
        return [patch, patch[:, ::-1], patch[::-1, :], patch[::-1, ::-1]]
    rot = [np.rot90(patch, k, axes=(0, 1)) for k in range(4)]
    return rot + [np.rot90(patch[:, ::-1], k, axes=(0, 1)) for k in range(4)]


def _tumor_probs(package, patches: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = Preprocess(package.config)(torch.from_numpy(np.ascontiguousarray(patches)))
        return torch.softmax(package.model(x).float(), dim=1)[:, package.config.tumor_index()].numpy()


def _grid_and_patches(slide_path, n=30):
    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide.thumbnail(mpp=8.0), l0_mpp=slide.mpp)
        grid = make_grid(l0_size=slide.dimensions, l0_mpp=slide.mpp, config=GridConfig(stride_px=96),
                         tissue_mask=tissue.mask, mask_l0_per_px=tissue.l0_per_px)
        idx = np.linspace(0, len(grid) - 1, n).astype(int)
        patches = np.stack([slide.read_at_mpp(xy, (96, 96), 0.972) for xy in grid.patch_l0_xy()[idx]])
    return grid, idx, patches


def test_views_are_the_flip_group_and_the_dihedral_group():
    patch = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(1, 4, 4, 3)
    for mode, n in (("none", 1), ("flips", 4), ("dihedral", 8)):
        got = make_views(torch.from_numpy(patch), mode).numpy()
        assert got.shape == (n, 4, 4, 3)
        want = [patch[0]] if mode == "none" else _numpy_views(patch[0], mode)
        assert {v.tobytes() for v in got} == {v.tobytes() for v in want}
        assert len({v.tobytes() for v in got}) == n  # all distinct
        assert np.array_equal(got[0], patch[0])  # view 0 is the patch itself


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_tta_is_the_mean_of_explicitly_rotated_patches(align_slide, asym_model_dir, mode):
    package = load_model_package(asym_model_dir)
    grid, idx, patches = _grid_and_patches(align_slide.path)
    # read_from nearest: the patches as _grid_and_patches reads them (read_at_mpp's default level)
    plain = run_inference(align_slide.path, grid, package,
                          config=InferenceConfig(workers=0, progress=False, runtime="torch", device="cpu",
                                                 read_from="nearest"))
    # batch 20: 5 patches x 4 flips or 2 x 8 dihedral views per forward pass; the last one is partial
    tta = run_inference(align_slide.path, grid, package,
                        config=InferenceConfig(workers=0, progress=False, runtime="torch", batch_size=20, tta=mode,
                                               device="cpu", read_from="nearest"))
    per_view = np.stack([_tumor_probs(package, np.stack([_numpy_views(p, mode)[v] for p in patches]))
                         for v in range(len(_numpy_views(patches[0], mode)))])
    t = package.config.tumor_index()
    assert np.abs(tta.probs[idx, t] - per_view.mean(axis=0)).max() < 1e-5
    assert np.abs(tta.probs_std[idx, t] - per_view.std(axis=0)).max() < 1e-5
    assert np.abs(plain.probs[idx, t] - per_view[0]).max() < 1e-5  # view 0: the patch as read
    assert plain.probs_std is None
    # the model is not invariant: the views really differ, and TTA moved the probabilities
    assert per_view.std(axis=0).max() > 0.02
    assert np.abs(tta.probs[:, t] - plain.probs[:, t]).max() > 0.01
    assert tta.batch_size == 20 // len(per_view) * len(per_view)  # what the model saw per forward pass


def test_tta_on_openvino_agrees_with_torch(align_slide, asym_model_dir, tmp_path):
    pytest.importorskip("openvino")
    package = load_model_package(asym_model_dir)
    grid, _, _ = _grid_and_patches(align_slide.path, n=2)
    # one infer request (synchronous), and 3 in flight (batches finish out of order on OpenVINO's threads)
    runs = {(rt, req): run_inference(align_slide.path, grid, package,
                                     config=InferenceConfig(workers=0, progress=False, runtime=rt, tta="dihedral",
                                                            cache_dir=str(tmp_path), ov_requests=req, batch_size=16,
                                                            device="cpu"))
            for rt, req in (("torch", 1), ("openvino", 1), ("openvino", 3))}
    ref = runs["torch", 1]
    for key in (("openvino", 1), ("openvino", 3)):
        assert runs[key].runtime["runtime"] == "openvino"
        assert np.abs(runs[key].probs - ref.probs).max() < 1e-4
        assert np.abs(runs[key].probs_std - ref.probs_std).max() < 1e-4
    assert ref.probs_std.max() > 0.02


def test_bad_tta_mode_is_refused():
    with pytest.raises(ConfigError, match="tta must be"):
        InferenceConfig(tta="rotate")


def _infer(slide, model_dir, out, *extra) -> int:
    return main([str(slide), "--model", str(model_dir), "--out", str(out), "--workers", "0", "--no-progress",
                 "--runtime", "torch", "--stride-px", "96", *extra])


OUTPUTS = ("heatmap.tif", "overlay.png", "tumor.geojson", "tumor.xml", "tiles.csv")


def test_tta_none_outputs_are_byte_identical_to_a_run_without_the_option(align_slide, asym_model_dir, tmp_path):
    assert _infer(align_slide.path, asym_model_dir, tmp_path / "plain") == 0
    assert _infer(align_slide.path, asym_model_dir, tmp_path / "none", "--tta", "none") == 0
    a, b = tmp_path / "plain" / align_slide.path.stem, tmp_path / "none" / align_slide.path.stem
    for name in OUTPUTS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not (b / "uncertainty.tif").exists()
    run = json.loads((b / "run.json").read_text())
    assert "uncertainty" not in run and "tta" not in run["output_key"]
    assert run["outputs"] == [*OUTPUTS, "run.json"]
    with open(b / "tiles.csv") as f:
        assert not any(c.startswith("tta_std") for c in next(csv.reader(f)))


def test_tta_run_writes_an_aligned_uncertainty_map_and_records_it(align_slide, asym_model_dir, tmp_path):
    assert _infer(align_slide.path, asym_model_dir, tmp_path / "plain") == 0
    out = tmp_path / "tta"
    assert _infer(align_slide.path, asym_model_dir, out, "--tta", "dihedral", "--threshold", "0.5") == 0
    d = out / align_slide.path.stem
    run = json.loads((d / "run.json").read_text())
    assert run["settings"]["run"]["inference"]["tta"] == "dihedral"
    assert run["output_key"]["tta"] == "dihedral"
    assert "uncertainty.tif" in run["outputs"]

    # uncertainty.tif overlays like heatmap.tif: same pages, shapes, tiles, resolution tags; nothing
    # outside the predicted cells
    with tifffile.TiffFile(d / "heatmap.tif") as h, tifffile.TiffFile(d / "uncertainty.tif") as u:
        assert len(h.pages) == len(u.pages) > 0
        for ph, pu in zip(h.pages, u.pages):
            assert ph.shape == pu.shape and ph.tile == pu.tile and ph.subfiletype == pu.subfiletype
            for tag in ("XResolution", "YResolution", "ResolutionUnit"):
                assert ph.tags[tag].value == pu.tags[tag].value
        meta_h, meta_u = json.loads(h.pages[0].description), json.loads(u.pages[0].description)
        assert meta_u["content"] == UNCERTAINTY_TIFF_CONTENT
        assert {k: v for k, v in meta_h.items() if k != "content"} == {k: v for k, v in meta_u.items()
                                                                       if k != "content"}
        levels_h = [p.asarray() for p in h.pages]
        levels_u = [p.asarray() for p in u.pages]
    rows = list(csv.DictReader(open(d / "tiles.csv")))
    assert "tta_std_tumor" in rows[0]
    grid = run["grid"]
    cells = np.array([[round((int(r["miny"]) + grid["offset_l0"]) / grid["cell_l0"]),
                       round((int(r["minx"]) + grid["offset_l0"]) / grid["cell_l0"])] for r in rows])
    predicted = np.zeros(levels_h[0].shape, bool)
    predicted[cells[:, 0], cells[:, 1]] = True  # centre merge: each patch its own cell
    for lh, lu in zip(levels_h, levels_u):
        assert lh.shape == lu.shape
    assert not levels_h[0][~predicted].any() and not levels_u[0][~predicted].any()
    # level 0 holds each patch's spread as tiles.csv says, x 255
    std = np.array([float(r["tta_std_tumor"]) for r in rows])
    assert np.abs(levels_u[0][cells[:, 0], cells[:, 1]] / 255.0 - std).max() <= 0.5 / 255 + 1e-6
    assert std.max() > 0.02 and std.max() <= 0.5
    unc = read_heatmap_tiff(d / "uncertainty.tif", content=UNCERTAINTY_TIFF_CONTENT)
    assert unc.shape_rc == tuple(run["heatmap"]["shape_rc"])

    # run.json's summary: the three areas split the predicted cells
    s = run["uncertainty"]
    cell_mm2 = run["heatmap"]["mpp"] ** 2 / 1e6
    assert s["tta"] == "dihedral"
    total = s["confident_tumor_mm2"] + s["confident_normal_mm2"] + s["uncertain_mm2"]
    assert total == pytest.approx(len(rows) * cell_mm2)
    assert s["max_std"] == pytest.approx(std.max(), abs=1e-6)

    # regions carry the spread of their cells
    geo = json.loads((d / "tumor.geojson").read_text())
    for feat in geo["features"]:
        m = feat["properties"]["measurements"]
        assert 0 <= m["mean_tta_std"] <= m["max_tta_std"] <= 0.5

    # overlay.png gains a second panel of the same size
    from PIL import Image

    w_plain, h_plain = Image.open(tmp_path / "plain" / align_slide.path.stem / "overlay.png").size
    w_tta, h_tta = Image.open(d / "overlay.png").size
    assert (w_tta, h_tta) == (2 * w_plain, h_plain)

    # changing --tta redoes the slide (it is in the output key); the same --tta skips it
    assert _infer(align_slide.path, asym_model_dir, out, "--tta", "dihedral") == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["status"] == "skipped"
    assert _infer(align_slide.path, asym_model_dir, out, "--tta", "flips") == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["status"] == "ok"
    # a finished --tta slide whose uncertainty.tif is gone is not finished: redone
    (d / "uncertainty.tif").unlink()
    assert _infer(align_slide.path, asym_model_dir, out, "--tta", "flips") == 0
    assert next(csv.DictReader(open(out / "summary.csv")))["status"] == "ok"
    assert (d / "uncertainty.tif").is_file()


def test_tta_with_the_mean_merge_paints_the_spread_on_the_heatmaps_cells(align_slide, asym_model_dir, tmp_path):
    # stride 48, patch 96, mean merge: each patch paints the 2 x 2 cells under its footprint's centre
    assert _infer(align_slide.path, asym_model_dir, tmp_path, "--tta", "flips", "--merge", "mean",
                  "--stride-px", "48") == 0
    d = tmp_path / align_slide.path.stem
    run = json.loads((d / "run.json").read_text())
    heat, unc = tifffile.imread(d / "heatmap.tif"), tifffile.imread(d / "uncertainty.tif")
    assert heat.shape == unc.shape == tuple(run["heatmap"]["shape_rc"])
    rows = list(csv.DictReader(open(d / "tiles.csv")))
    grid = run["grid"]
    predicted = np.zeros(heat.shape, bool)
    for r in rows:
        row = round((int(r["miny"]) + grid["offset_l0"]) / grid["cell_l0"])
        col = round((int(r["minx"]) + grid["offset_l0"]) / grid["cell_l0"])
        predicted[max(0, row - 1): row + 1, max(0, col - 1): col + 1] = True  # offsets -1 and 0
    assert unc[predicted].any() and not unc[~predicted].any() and not heat[~predicted].any()
    s = run["uncertainty"]
    cell_mm2 = run["heatmap"]["mpp"] ** 2 / 1e6
    total = s["confident_tumor_mm2"] + s["confident_normal_mm2"] + s["uncertain_mm2"]
    assert total == pytest.approx(predicted.sum() * cell_mm2)


def _hm(values, predicted):
    return Heatmap(prob=np.array(values, np.float32), predicted=np.array(predicted, bool), cell_l0=100.0,
                   l0_mpp=0.5, merge="centre")


def test_uncertainty_summary_splits_the_predicted_area_by_the_rule():
    # cells: confident tumour, confident normal, near the threshold, high spread, not predicted
    pred = [[1, 1, 1, 1, 0]]
    heat = _hm([[0.9, 0.1, 0.55, 0.95, 0.0]], pred)
    unc = _hm([[0.02, 0.05, 0.01, 0.2, 0.0]], pred)
    s = uncertainty_summary(heat, unc, threshold=0.5)
    cell_mm2 = (100.0 * 0.5) ** 2 / 1e6  # 50 um cells
    assert s["confident_tumor_mm2"] == pytest.approx(1 * cell_mm2)
    assert s["confident_normal_mm2"] == pytest.approx(1 * cell_mm2)
    assert s["uncertain_mm2"] == pytest.approx(2 * cell_mm2)
    assert s["max_std"] == pytest.approx(0.2)
    assert s["mean_std"] == pytest.approx((0.02 + 0.05 + 0.01 + 0.2) / 4)
    with pytest.raises(ConfigError):
        uncertainty_summary(heat, _hm([[0, 0, 0, 0, 0]], [[1, 1, 1, 0, 0]]), threshold=0.5)


def test_overlay_uncertainty_panel_colours_the_spread():
    from matplotlib import colormaps

    thumb = np.full((20, 40, 3), 200, np.uint8)  # 1 level-0 px per thumbnail px
    heat = Heatmap(prob=np.array([[0.9, 0.2]], np.float32), predicted=np.ones((1, 2), bool), cell_l0=20.0,
                   l0_mpp=0.25, merge="centre")
    unc = Heatmap(prob=np.array([[0.25, 0.0]], np.float32), predicted=np.ones((1, 2), bool), cell_l0=20.0,
                  l0_mpp=0.25, merge="centre")
    plain = render_overlay(thumb, 1.0, heat, min_width=40)
    both = render_overlay(thumb, 1.0, heat, uncertainty=unc, min_width=40)
    assert both.shape == (plain.shape[0], 2 * plain.shape[1], 3)
    assert np.array_equal(both[:, :40][40:60], plain[40:60])  # the first panel unchanged (below the title)
    # right panel, left cell (std 0.25 = half of the 0..0.5 scale), alpha 0.5 over grey 200
    expected = 0.5 * 200 + 0.5 * np.array(colormaps["viridis"](0.5)[:3]) * 255
    assert np.abs(both[50, 40 + 10].astype(float) - expected).max() <= 8
    expected0 = 0.5 * 200 + 0.5 * np.array(colormaps["viridis"](0.0)[:3]) * 255
    assert np.abs(both[50, 40 + 30].astype(float) - expected0).max() <= 8
