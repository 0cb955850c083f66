"""Exporters: heatmap TIFF, overlay PNG, tumour regions (GeoJSON / ASAP XML), CSV / JSON, atomicity."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import shapely
from PIL import Image

from wsi_toolkit.annotations import read_asap_xml, read_geojson
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.export import (
    INFERNO_LUT,
    SUMMARY_COLUMNS,
    atomic_path,
    blend_heatmap,
    colormap,
    render_overlay,
    tumor_regions,
    write_heatmap_tiff,
    write_json_atomic,
    write_regions_asap,
    write_regions_geojson,
    write_summary_csv,
    write_text_atomic,
    write_tiles_csv,
)
from wsi_toolkit.export.overlay import LEGEND_PX, TITLE_BAR_PX
from wsi_toolkit.heatmap import Heatmap, stitch
from wsi_toolkit.tiling import make_grid

PCAM_CELL_UM = 32 * 0.972  # one heatmap pixel, um


def _no_partials(folder) -> bool:
    return not [p for p in os.listdir(folder) if ".partial" in p]


def _single_cell_heatmap(shape_rc, hot_rc, *, cell_l0, l0_mpp, prob=1.0) -> Heatmap:
    p = np.zeros(shape_rc, np.float32)
    predicted = np.zeros(shape_rc, bool)
    p[hot_rc] = prob
    predicted[hot_rc] = True
    return Heatmap(prob=p, predicted=predicted, cell_l0=cell_l0, l0_mpp=l0_mpp, merge="centre")


# ------------------------------------------------------------------------------------------------
# Tumour regions from a disc of known size
# ------------------------------------------------------------------------------------------------


def _disc_heatmap(l0_mpp: float, *, centre_um=(2100.0, 1700.0), radius_um=450.0):
    """Centre-merge heatmap of a tissue rectangle with prob 0.9 inside a disc, 0.1 outside.

    The probabilities come from each patch's centre in level-0 px, compared to the disc in um.
    """
    w0, h0 = round(4200 / l0_mpp), round(3400 / l0_mpp)  # 4.2 x 3.4 mm
    k = 16.0 / l0_mpp  # mask at 16 um/px
    mask = np.zeros((math.ceil(h0 / k), math.ceil(w0 / k)), bool)
    mask[10:-10, 10:-10] = True
    grid = make_grid(l0_size=(w0, h0), l0_mpp=l0_mpp, tissue_mask=mask, mask_l0_per_px=k)
    centres_um = (grid.patch_l0_xy() + grid.patch_l0 / 2) * l0_mpp
    inside = np.hypot(centres_um[:, 0] - centre_um[0], centres_um[:, 1] - centre_um[1]) < radius_um
    probs = np.where(inside, 0.9, 0.1)
    return stitch(grid, probs, merge="centre"), grid


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_disc_becomes_one_region_of_the_right_size_and_place(l0_mpp):
    centre_um, radius_um = (2100.0, 1700.0), 450.0
    hm, _ = _disc_heatmap(l0_mpp, centre_um=centre_um, radius_um=radius_um)
    regions = tumor_regions(hm, threshold=0.5)
    assert len(regions) == 1
    reg = regions[0]
    poly = reg.polygon_l0
    assert isinstance(poly, shapely.Polygon) and poly.is_valid
    assert reg.area_mm2 == pytest.approx(math.pi * radius_um**2 / 1e6, rel=0.10)
    # Level-0 px: centroid within one cell of the disc centre.
    cx_l0, cy_l0 = centre_um[0] / l0_mpp, centre_um[1] / l0_mpp
    assert math.hypot(poly.centroid.x - cx_l0, poly.centroid.y - cy_l0) <= hm.cell_l0
    minx, miny, maxx, maxy = poly.bounds
    r_l0 = radius_um / l0_mpp
    assert cx_l0 - r_l0 - hm.cell_l0 <= minx and maxx <= cx_l0 + r_l0 + hm.cell_l0
    assert cy_l0 - r_l0 - hm.cell_l0 <= miny and maxy <= cy_l0 + r_l0 + hm.cell_l0
    assert abs(reg.longest_diameter_um - 2 * radius_um) <= 2 * PCAM_CELL_UM
    assert reg.max_prob == pytest.approx(0.9, abs=1e-6)
    assert reg.mean_prob == pytest.approx(0.9, abs=1e-6)
    # The polygon is exactly the union of its cells: area = cell count x cell area.
    n_cells = int(((hm.prob >= 0.5) & hm.predicted).sum())
    assert poly.area == pytest.approx(n_cells * hm.cell_l0**2, rel=1e-9)


def test_regions_are_sorted_filtered_and_8_connected():
    l0_mpp = 0.243
    cell = PCAM_CELL_UM / l0_mpp  # 128 l0 px
    p = np.zeros((20, 20), np.float32)
    p[2:5, 2:5] = 0.6  # 9 cells
    p[10, 10] = 0.95  # 2 cells touching at a corner: one 8-connected region
    p[11, 11] = 0.7
    p[15:17, 3:5] = 0.4  # below threshold
    hm = Heatmap(prob=p, predicted=np.ones_like(p, bool), cell_l0=cell, l0_mpp=l0_mpp, merge="centre")
    regions = tumor_regions(hm, threshold=0.5)
    assert [r.max_prob for r in regions] == pytest.approx([0.95, 0.6])
    diag = regions[0]
    assert diag.polygon_l0.area == pytest.approx(2 * cell**2)
    assert diag.area_mm2 == pytest.approx(2 * PCAM_CELL_UM**2 / 1e6)
    assert diag.mean_prob == pytest.approx((0.95 + 0.7) / 2)
    assert diag.longest_diameter_um == pytest.approx(math.hypot(2, 2) * PCAM_CELL_UM)
    square = regions[1]
    assert square.polygon_l0.bounds == pytest.approx((2 * cell, 2 * cell, 5 * cell, 5 * cell))
    assert square.longest_diameter_um == pytest.approx(math.hypot(3, 3) * PCAM_CELL_UM)
    # min_area_um2 drops the 2-cell region (1935 um^2) but keeps the 9-cell one (8707 um^2).
    kept = tumor_regions(hm, threshold=0.5, min_area_um2=3 * PCAM_CELL_UM**2)
    assert [r.max_prob for r in kept] == pytest.approx([0.6])
    assert tumor_regions(hm, threshold=0.99) == []
    with pytest.raises(ConfigError):
        tumor_regions(hm, threshold=1.5)


def test_unpredicted_cells_are_never_tumor():
    p = np.full((5, 5), 0.9, np.float32)
    predicted = np.zeros((5, 5), bool)
    hm = Heatmap(prob=p, predicted=predicted, cell_l0=128.0, l0_mpp=0.243, merge="centre")
    assert tumor_regions(hm, threshold=0.5) == []


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_regions_round_trip_through_geojson_and_asap(tmp_path, l0_mpp):
    hm, _ = _disc_heatmap(l0_mpp)
    regions = tumor_regions(hm, threshold=0.5)
    reg = regions[0]

    write_regions_geojson(tmp_path / "tumor.geojson", regions, slide_name="slide_001")
    doc = json.loads((tmp_path / "tumor.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    assert doc["features"][0]["properties"]["classification"]["name"] == "Tumor"
    anns = read_geojson(tmp_path / "tumor.geojson")
    assert len(anns) == 1
    ann = anns[0]
    assert ann.group == "Tumor"
    assert ann.polygon.symmetric_difference(reg.polygon_l0).area == pytest.approx(0.0, abs=1e-6)
    m = ann.properties["measurements"]
    assert m["max_probability"] == pytest.approx(reg.max_prob)
    assert m["mean_probability"] == pytest.approx(reg.mean_prob)
    assert m["area_mm2"] == pytest.approx(reg.area_mm2)
    assert m["longest_diameter_um"] == pytest.approx(reg.longest_diameter_um)
    # The stated area matches the polygon QuPath will draw.
    assert m["area_mm2"] == pytest.approx(ann.polygon.area * l0_mpp**2 / 1e6, rel=1e-9)

    write_regions_asap(tmp_path / "tumor.xml", regions)
    anns = read_asap_xml(tmp_path / "tumor.xml")
    assert len(anns) == 1
    assert anns[0].group == "Tumor"
    assert anns[0].polygon.area == pytest.approx(reg.polygon_l0.area, rel=1e-6)
    assert anns[0].polygon.symmetric_difference(reg.polygon_l0).area <= 1e-6 * reg.polygon_l0.area
    assert _no_partials(tmp_path)


def test_empty_region_list_writes_empty_files(tmp_path):
    write_regions_geojson(tmp_path / "t.geojson", [])
    write_regions_asap(tmp_path / "t.xml", [])
    assert read_geojson(tmp_path / "t.geojson") == []
    assert read_asap_xml(tmp_path / "t.xml") == []


# ------------------------------------------------------------------------------------------------
# Heatmap TIFF
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_heatmap_tiff_opens_in_openslide_and_tifffile(tmp_path, l0_mpp):
    openslide = pytest.importorskip("openslide")
    tifffile = pytest.importorskip("tifffile")
    # 300 x 200 cells: with tile 64 the levels are 300x200, 150x100, 75x50, 38x25 (w x h).
    cell_l0 = PCAM_CELL_UM / l0_mpp
    grid = make_grid(l0_size=(math.floor(300 * cell_l0), math.floor(200 * cell_l0)), l0_mpp=l0_mpp)
    assert grid.shape_rc == (200, 300)
    probs = np.random.default_rng(5).uniform(0, 1, len(grid))
    probs[::11] = 0.0
    hm = stitch(grid, probs)
    path = tmp_path / "heatmap.tif"
    sizes = write_heatmap_tiff(path, hm, tile=64)
    expected_sizes = [(300, 200), (150, 100), (75, 50), (38, 25)]
    assert sizes == expected_sizes

    with tifffile.TiffFile(path) as tf:
        pages = tf.pages
        assert len(pages) == 4
        desc = json.loads(pages[0].description)
        assert desc["content"] == "tumour probability x 255"
        assert desc["mpp"] == pytest.approx(31.104)
        assert desc["origin_l0"] == [0, 0]
        assert desc["shape_rc"] == [200, 300]
        for level, page in enumerate(pages):
            assert (page.imagewidth, page.imagelength) == expected_sizes[level]
            assert page.is_tiled and (page.tilewidth, page.tilelength) == (64, 64)
            assert page.samplesperpixel == 1 and page.dtype == np.uint8
            assert int(page.subfiletype) == (1 if level else 0)
            assert page.tags["ResolutionUnit"].value == 3  # centimetre
            x_res = page.tags["XResolution"].value
            px_per_cm = x_res[0] / x_res[1]
            assert 1e4 / px_per_cm == pytest.approx(31.104 * 2**level, rel=1e-6)
        level0 = pages[0].asarray()

    # Exact pixel values at a few cells: round(prob * 255).
    for index in (0, 11, 1234, len(grid) - 1, 40_000):
        r, c = grid.grid_rc[index]
        assert level0[r, c] == round(float(np.float32(probs[index])) * 255)

    slide = openslide.OpenSlide(str(path))
    try:
        assert slide.level_count == 4
        assert slide.level_dimensions == tuple(expected_sizes)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(31.104, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(31.104, rel=1e-6)
        for index in (0, 11, 1234, 40_000):
            r, c = (int(v) for v in grid.grid_rc[index])
            rgba = np.asarray(slide.read_region((c, r), 0, (1, 1)))[0, 0]
            value = round(float(np.float32(probs[index])) * 255)
            assert tuple(rgba) == (value, value, value, 255)
        # Level 1 pixel (30, 20) (x, y): mean of the 2x2 block of (all predicted) cells below it.
        block = hm.prob[40:42, 60:62].astype(np.float64)
        l1 = np.asarray(slide.read_region((2 * 30, 2 * 20), 1, (1, 1)))  # location in level-0 px
        assert l1[0, 0, 0] == round(block.mean() * 255)
    finally:
        slide.close()
    assert _no_partials(tmp_path)


def test_heatmap_tiff_reduced_levels_ignore_unpredicted_cells(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = np.zeros((40, 40), np.float32)
    predicted = np.zeros((40, 40), bool)
    p[10, 10], predicted[10, 10] = 0.8, True  # its 2x2 block has 3 unpredicted neighbours
    hm = Heatmap(prob=p, predicted=predicted, cell_l0=128.0, l0_mpp=0.243, merge="centre")
    write_heatmap_tiff(tmp_path / "h.tif", hm, tile=16)
    with tifffile.TiffFile(tmp_path / "h.tif") as tf:
        assert [pg.shape for pg in tf.pages] == [(40, 40), (20, 20), (10, 10)]
        assert tf.pages[1].asarray()[5, 5] == round(0.8 * 255)
        assert tf.pages[2].asarray()[2, 2] == round(0.8 * 255)
        assert tf.pages[1].asarray().sum() == round(0.8 * 255)


def test_heatmap_tiff_failure_leaves_old_file_and_no_partial(tmp_path, monkeypatch):
    tifffile = pytest.importorskip("tifffile")
    grid = make_grid(l0_size=(128 * 40, 128 * 40), l0_mpp=0.243)
    hm = stitch(grid, np.full(len(grid), 0.5))
    path = tmp_path / "heatmap.tif"
    path.write_bytes(b"old")
    real_write = tifffile.TiffWriter.write
    calls = []

    def write_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # level 0 written, fail on level 1
            raise RuntimeError("disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffWriter, "write", write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_heatmap_tiff(path, hm, tile=16)
    assert path.read_bytes() == b"old"
    assert _no_partials(tmp_path)


def test_heatmap_tiff_rejects_bad_tile(tmp_path):
    hm = _single_cell_heatmap((4, 4), (1, 1), cell_l0=128.0, l0_mpp=0.243)
    with pytest.raises(ConfigError):
        write_heatmap_tiff(tmp_path / "h.tif", hm, tile=100)
    assert not (tmp_path / "h.tif").exists()


# ------------------------------------------------------------------------------------------------
# Overlay
# ------------------------------------------------------------------------------------------------


def test_colormap_is_the_lut_and_lightness_rises():
    assert INFERNO_LUT.shape == (256, 3) and INFERNO_LUT.dtype == np.uint8
    assert np.array_equal(colormap(np.array([0.0, 1.0, 0.5])), INFERNO_LUT[[0, 255, 128]])
    assert np.array_equal(colormap(np.array([-1.0, 2.0])), INFERNO_LUT[[0, 255]])
    assert colormap(np.zeros((2, 3))).shape == (2, 3, 3)
    luma = INFERNO_LUT.astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(luma) >= -0.5)  # perceptual: lightness is monotonic (up to rounding)
    assert luma[255] - luma[0] > 200
    assert len({tuple(c) for c in INFERNO_LUT.tolist()}) == 256


@pytest.mark.parametrize(
    "l0_mpp, thumb_um_px, l0_size, hot_rc",
    [
        (0.226, 8.0, (60_000, 40_000), (37, 101)),  # narrow thumbnail, enlarged 2x
        (0.243, 16.0, (50_000, 30_000), (3, 5)),  # enlarged 4x
        (0.243, 2.0, (30_000, 8_000), (10, 200)),  # wide thumbnail, not enlarged
    ],
)
def test_overlay_colours_exactly_the_pixels_inside_the_hot_cell(tmp_path, l0_mpp, thumb_um_px, l0_size, hot_rc):
    k = thumb_um_px / l0_mpp  # level-0 px per thumbnail px
    w0, h0 = l0_size
    thumb = np.full((math.ceil(h0 / k), math.ceil(w0 / k), 3), 200, np.uint8)
    cell_l0 = PCAM_CELL_UM / l0_mpp
    shape_rc = (math.ceil(h0 / cell_l0), math.ceil(w0 / cell_l0))
    hm = _single_cell_heatmap(shape_rc, hot_rc, cell_l0=cell_l0, l0_mpp=l0_mpp)

    scale = max(1, math.ceil(1000 / thumb.shape[1]))
    img = render_overlay(thumb, k, hm, title="slide", path=tmp_path / "overlay.png")
    ph, pw = thumb.shape[0] * scale, thumb.shape[1] * scale
    assert img.shape == (TITLE_BAR_PX + ph + LEGEND_PX, pw, 3) and pw >= 1000
    panel = img[TITLE_BAR_PX : TITLE_BAR_PX + ph]
    coloured = np.any(panel != 200, axis=-1)

    # Expected from geometry: a picture pixel is coloured iff its centre (level-0) is in the cell square.
    k_out = k / scale
    x_l0 = (np.arange(pw) + 0.5) * k_out
    y_l0 = (np.arange(ph) + 0.5) * k_out
    r, c = hot_rc
    in_x = (c * cell_l0 <= x_l0) & (x_l0 < (c + 1) * cell_l0)
    in_y = (r * cell_l0 <= y_l0) & (y_l0 < (r + 1) * cell_l0)
    expected = in_y[:, None] & in_x[None, :]
    assert expected.sum() > 0
    assert np.array_equal(coloured, expected)
    blended = np.rint(0.5 * 200 + 0.5 * INFERNO_LUT[255].astype(float)).astype(np.uint8)
    assert np.all(panel[expected] == blended)

    # The PNG on disk is the returned picture.
    assert np.array_equal(np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")), img)
    assert _no_partials(tmp_path)


def test_overlay_has_a_legend_with_the_colour_bar(tmp_path):
    l0_mpp, k = 0.243, 8.0 / 0.243
    thumb = np.full((120, 300, 3), 230, np.uint8)
    grid = make_grid(l0_size=(round(300 * k), round(120 * k)), l0_mpp=l0_mpp)
    hm = stitch(grid, np.random.default_rng(0).uniform(0, 1, len(grid)))
    img = render_overlay(thumb, k, hm, title="legend test", threshold=0.5)
    legend = img[-LEGEND_PX:]
    colours = {tuple(v) for v in legend.reshape(-1, 3).tolist()}
    assert {tuple(v) for v in INFERNO_LUT.tolist()} <= colours
    assert (0, 0, 0) in colours  # tick labels
    title_bar = img[:TITLE_BAR_PX]
    assert np.any(title_bar.reshape(-1, 3).max(axis=1) > 200)  # title text drawn on the dark bar
    assert img.shape[1] >= 1000


def test_overlay_draws_the_tissue_outline(tmp_path):
    l0_mpp, k = 0.243, 8.0 / 0.243
    thumb = np.full((250, 1000, 3), 230, np.uint8)
    grid = make_grid(l0_size=(round(1000 * k), round(250 * k)), l0_mpp=l0_mpp)
    hm = stitch(grid, np.zeros(len(grid)))
    tissue = shapely.box(100 * k, 50 * k, 400 * k, 200 * k)  # thumbnail px 100..400 x 50..200
    img = render_overlay(thumb, k, hm, tissue_polygons_l0=tissue, alpha=0.0)
    panel = img[TITLE_BAR_PX : TITLE_BAR_PX + 250]
    green = np.all(panel == (0, 200, 0), axis=-1)
    rows, cols = np.nonzero(green)
    assert rows.size > 0
    assert abs(rows.min() - 50) <= 2 and abs(rows.max() - 199) <= 2
    assert abs(cols.min() - 100) <= 2 and abs(cols.max() - 399) <= 2
    assert not green[120, 250]  # the inside is not filled


def test_blend_heatmap_leaves_unpredicted_pixels_alone():
    thumb = np.random.default_rng(3).integers(0, 256, (50, 1200, 3), dtype=np.uint8)
    hm = _single_cell_heatmap((10, 10), (0, 0), cell_l0=128.0, l0_mpp=0.243, prob=0.0)
    panel, l0_per_px = blend_heatmap(thumb, 32.0, hm, alpha=0.5)
    assert l0_per_px == 32.0
    changed = np.any(panel != thumb, axis=-1)
    assert not changed[:, 4:].any() and not changed[4:, :].any()


# ------------------------------------------------------------------------------------------------
# Tables and JSON
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l0_mpp", [0.243, 0.226])
def test_tiles_csv_has_wsinfer_columns_in_grid_order(tmp_path, l0_mpp):
    mask = np.zeros((40, 60), bool)
    mask[5:35, 8:50] = True
    grid = make_grid(l0_size=(60 * 64, 40 * 64), l0_mpp=l0_mpp, tissue_mask=mask, mask_l0_per_px=64.0)
    rng = np.random.default_rng(7)
    tumor = rng.uniform(0, 1, len(grid))
    write_tiles_csv(tmp_path / "tiles.csv", grid, {"notumor": 1 - tumor, "tumor": tumor})
    with open(tmp_path / "tiles.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["minx", "miny", "width", "height", "prob_notumor", "prob_tumor"]
    assert len(rows) == len(grid) + 1
    cell = 32 * 0.972 / l0_mpp
    offset = 32 * 0.972 / l0_mpp  # (96 - 32) / 2 model px = one cell
    side = round(96 * 0.972 / l0_mpp)
    for (r, c), p, row in zip(grid.grid_rc.tolist(), tumor, rows[1:]):
        assert int(row[0]) == round(c * cell - offset)
        assert int(row[1]) == round(r * cell - offset)
        assert int(row[2]) == int(row[3]) == side
        assert len(row[5].split(".")[1]) == 6
        assert float(row[5]) == pytest.approx(p, abs=5e-7)
        assert float(row[4]) == pytest.approx(1 - p, abs=5e-7)
    assert _no_partials(tmp_path)


def test_tiles_csv_rejects_wrong_length_and_writes_nothing(tmp_path):
    grid = make_grid(l0_size=(512, 512), l0_mpp=0.243)
    with pytest.raises(ConfigError):
        write_tiles_csv(tmp_path / "tiles.csv", grid, {"tumor": np.zeros(3)})
    with pytest.raises(ConfigError):
        write_tiles_csv(tmp_path / "tiles.csv", grid, {})
    assert os.listdir(tmp_path) == []


def test_summary_csv(tmp_path):
    rows = [
        {"slide": "a.tif", "status": "ok", "slide_score": 0.875, "tumor_area_mm2": 1.25, "n_patches": 1200,
         "seconds": 12.5},
        {"slide": "b,with comma.tif", "status": "error", "error": "SlideReadError: truncated", "slide_score": None,
         "seconds": float("nan"), "model": "pcam-resnet50"},
    ]
    write_summary_csv(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", newline="") as fh:
        got = list(csv.DictReader(fh))
    assert list(got[0].keys()) == [*SUMMARY_COLUMNS, "model"]
    assert got[0] == {"slide": "a.tif", "status": "ok", "error": "", "slide_score": "0.875",
                      "tumor_area_mm2": "1.25", "n_patches": "1200", "seconds": "12.5", "model": ""}
    assert got[1]["slide"] == "b,with comma.tif"
    assert got[1]["error"] == "SlideReadError: truncated"
    assert got[1]["slide_score"] == "" and got[1]["seconds"] == ""
    assert got[1]["model"] == "pcam-resnet50"
    assert _no_partials(tmp_path)


def test_write_json_atomic_converts_numpy_and_nan(tmp_path):
    obj = {"n": np.int64(3), "x": np.float32(0.5), "arr": np.arange(3), "bad": float("nan"),
           "path": tmp_path / "a.tif", "shape": (2, 3)}
    write_json_atomic(tmp_path / "run.json", obj)
    assert json.loads((tmp_path / "run.json").read_text()) == {
        "n": 3, "x": 0.5, "arr": [0, 1, 2], "bad": None, "path": str(tmp_path / "a.tif"), "shape": [2, 3]}
    assert _no_partials(tmp_path)


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def test_atomic_path_renames_on_success(tmp_path):
    final = tmp_path / "out.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name == f".out.txt.partial-{os.getpid()}"
        tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_cleans_up_when_the_writer_fails_midway(tmp_path):
    final = tmp_path / "out.csv"
    final.write_text("previous run")

    def writer(path, fail_after):
        with open(path, "w") as fh:
            for i in range(10):
                if i == fail_after:
                    raise OSError("No space left on device")
                fh.write(f"row {i}\n")

    with pytest.raises(OSError, match="No space"):
        with atomic_path(final) as tmp:
            writer(tmp, fail_after=5)
    assert final.read_text() == "previous run"
    assert os.listdir(tmp_path) == ["out.csv"]

    fresh = tmp_path / "fresh.csv"
    with pytest.raises(OSError):
        with atomic_path(fresh) as tmp:
            writer(tmp, fail_after=3)
    assert not fresh.exists()
    assert _no_partials(tmp_path)


def test_atomic_path_requires_the_file_to_be_written(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "never.txt"):
            pass
    assert os.listdir(tmp_path) == []


def test_write_text_atomic_overwrites(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "one\n")
    write_text_atomic(tmp_path / "a.txt", "two\r\n")
    assert (tmp_path / "a.txt").read_bytes() == b"two\r\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_export_does_not_import_tissue_detection():
    import subprocess
    import sys

    code = "import sys, wsi_toolkit.export; print('wsi_toolkit.tissue' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_inferno_lut_is_matplotlibs_inferno_within_7_levels():
    from matplotlib import colormaps

    full = np.rint(colormaps["inferno"](np.arange(256))[:, :3] * 255.0)
    assert np.abs(INFERNO_LUT.astype(float) - full).max() <= 7
