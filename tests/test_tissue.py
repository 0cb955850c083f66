"""Tissue detection on synthetic thumbnails, and mask -> level-0 polygons.

Every thumbnail is drawn here with numpy: glass ~(240, 240, 240) with noise, H&E-like tissue
colours, pen strokes; edges blurred a little as a downsampled thumbnail's are. The truth of
each test is the geometry that was drawn, never the code's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
from scipy import ndimage

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import mask_to_polygons
from wsi_toolkit.tissue import TissueConfig, TissueMask, detect_tissue

L0_MPP = 0.243  # Radboudumc level 0
THUMB_MPP = 8.0
K = THUMB_MPP / L0_MPP  # level-0 px per thumbnail px

GLASS = (240, 240, 240)
PINK = (220, 150, 200)  # eosin-dominated tissue, hue ~317 deg, saturation 0.32
PURPLE = (120, 80, 170)  # dense lymphocytes / haematoxylin, hue ~267 deg, R > G
FAINT = (235, 215, 228)  # faint eosin, saturation 0.085
BLUE_PEN = (40, 80, 200)  # hue 225 deg, G >= R
GREEN_PEN = (40, 160, 70)
BLACK_INK = (20, 20, 30)

SHAPE = (200, 260)  # thumbnail (H, W): 1.6 x 2.1 mm at 8 um/px


def grid(shape=SHAPE):
    return np.mgrid[: shape[0], : shape[1]]


def ellipse(center_rc, radii_rc, shape=SHAPE) -> np.ndarray:
    rr, cc = grid(shape)
    return ((rr - center_rc[0]) / radii_rc[0]) ** 2 + ((cc - center_rc[1]) / radii_rc[1]) ** 2 <= 1.0


def disk(center_rc, radius, shape=SHAPE) -> np.ndarray:
    return ellipse(center_rc, (radius, radius), shape)


def band(p0_rc, p1_rc, half_width, shape=SHAPE) -> np.ndarray:
    """Pixels within ``half_width`` of the segment p0-p1 (a pen stroke)."""
    rr, cc = grid(shape)
    p0, p1 = np.asarray(p0_rc, float), np.asarray(p1_rc, float)
    d = p1 - p0
    t = np.clip(((rr - p0[0]) * d[0] + (cc - p0[1]) * d[1]) / (d @ d), 0.0, 1.0)
    return np.hypot(rr - (p0[0] + t * d[0]), cc - (p0[1] + t * d[1])) <= half_width


class Canvas:
    """A thumbnail being painted: glass, then regions of colour, then blur + noise -> uint8."""

    def __init__(self, shape=SHAPE, seed=0):
        self.rng = np.random.default_rng(seed)
        self.img = np.empty((*shape, 3), np.float64)
        self.img[:] = GLASS

    def paint(self, region: np.ndarray, rgb, texture: float = 6.0) -> Canvas:
        self.img[region] = rgb
        self.img[region] += self.rng.normal(0.0, texture, (int(region.sum()), 3))
        return self

    def thumb(self, noise: float = 2.0, blur: float = 0.8) -> np.ndarray:
        img = ndimage.gaussian_filter(self.img, (blur, blur, 0)) if blur else self.img.copy()
        img += self.rng.normal(0.0, noise, img.shape)
        return np.clip(np.round(img), 0, 255).astype(np.uint8)


def detect(thumb, **cfg) -> TissueMask:
    return detect_tissue(thumb, l0_mpp=L0_MPP, config=TissueConfig(**cfg))


def grow(region: np.ndarray, px: int) -> np.ndarray:
    return ndimage.binary_dilation(region, iterations=px)


# --------------------------------------------------------------------------- area recovery


def _scene(kind: str):
    """(thumbnail, {name: drawn region}) for the area tests."""
    canvas = Canvas(seed=sum(map(ord, kind)))
    regions = {}
    blob = ellipse((95, 100), (60, 75)) | ellipse((140, 160), (40, 45))  # irregular piece
    if kind == "faint+dense":
        # Dense purple dominates (~35 % of the thumbnail) next to a smaller faint piece:
        # the case where a plain Otsu on saturation settles between faint and dense tissue.
        regions["dense"] = ellipse((100, 90), (80, 70))
        regions["faint"] = disk((100, 210), 35) & ~grow(regions["dense"], 4)
        canvas.paint(regions["dense"], PURPLE).paint(regions["faint"], FAINT)
    else:
        regions[kind] = blob
        canvas.paint(blob, {"pink": PINK, "purple": PURPLE, "faint": FAINT}[kind])
    return canvas.thumb(), regions


@pytest.mark.parametrize("kind", ["pink", "purple", "faint", "faint+dense"])
def test_drawn_tissue_area_is_recovered_within_10_percent(kind):
    thumb, regions = _scene(kind)
    tm = detect(thumb)
    truth = np.logical_or.reduce(list(regions.values()))

    assert tm.mask.shape == SHAPE and tm.mask.dtype == bool
    assert abs(int(tm.mask.sum()) - int(truth.sum())) <= 0.10 * truth.sum()
    for name, region in regions.items():  # each piece, not only the total
        assert tm.mask[region].mean() >= 0.90, f"{name} tissue lost (threshold {tm.threshold:.3f})"
    assert not tm.mask[~grow(truth, 3)].any(), "glass detected as tissue"
    assert tm.area_um2() == pytest.approx(tm.mask.sum() * THUMB_MPP**2)


@pytest.mark.parametrize("thumb_mpp", [4.0, 8.0, 16.0])
def test_area_in_physical_units_does_not_depend_on_thumbnail_resolution(thumb_mpp):
    radius_um = 400.0
    shape = (int(1600 / thumb_mpp), int(1600 / thumb_mpp))
    centre = (shape[0] / 2, shape[1] / 2)
    thumb = Canvas(shape).paint(disk(centre, radius_um / thumb_mpp, shape), PINK).thumb()

    tm = detect_tissue(thumb, l0_mpp=L0_MPP, config=TissueConfig(thumb_mpp=thumb_mpp))

    assert tm.area_mm2() == pytest.approx(math.pi * (radius_um / 1000) ** 2, rel=0.10)
    assert tm.l0_per_px == pytest.approx(thumb_mpp / L0_MPP)
    assert tm.thumb_mpp == thumb_mpp


# --------------------------------------------------------------------------- pen and ink

STROKE = band((30, 20), (170, 240), 7) | band((20, 200), (60, 250), 5)  # two strokes on glass
TISSUE_AWAY = disk((160, 50), 30)  # tissue elsewhere on the slide


@pytest.mark.parametrize("ink", [BLUE_PEN, GREEN_PEN, BLACK_INK], ids=["blue", "green", "black"])
def test_pen_strokes_on_glass_are_not_tissue(ink):
    stroke = STROKE & ~grow(TISSUE_AWAY, 6)
    thumb = Canvas().paint(TISSUE_AWAY, PINK).paint(stroke, ink, texture=4.0).thumb()

    tm = detect(thumb)

    assert not tm.mask[grow(stroke, 2)].any(), "ink taken for tissue"
    assert tm.mask[TISSUE_AWAY].mean() >= 0.9
    assert tm.pen_fraction == pytest.approx(stroke.mean(), rel=0.25)


@pytest.mark.parametrize(
    "core, rim", [(BLUE_PEN, (195, 210, 240)), (GREEN_PEN, (185, 220, 195))], ids=["blue", "green"]
)
def test_pale_rim_of_a_marker_stroke_is_not_tissue(core, rim):
    # Diluted ink at a stroke's edge keeps the hue but drops below pen_min_saturation
    # (saturation ~0.19), so only growing the ink mask keeps a 4 px (32 um) rim out.
    stroke = STROKE & ~grow(TISSUE_AWAY, 8)
    halo = grow(stroke, 4) & ~stroke & ~grow(TISSUE_AWAY, 5)
    canvas = Canvas().paint(TISSUE_AWAY, PINK).paint(halo, rim, texture=3.0)
    thumb = canvas.paint(stroke, core, texture=4.0).thumb()

    tm = detect(thumb)

    assert not tm.mask[grow(stroke, 5)].any()
    assert tm.mask[TISSUE_AWAY].mean() >= 0.9


def test_pen_is_tissue_when_suppression_is_off():
    thumb = Canvas().paint(TISSUE_AWAY, PINK).paint(STROKE & ~grow(TISSUE_AWAY, 6), BLUE_PEN).thumb()

    tm = detect(thumb, suppress_pen=False)

    assert tm.pen_fraction == 0.0
    assert tm.mask[STROKE & ~grow(TISSUE_AWAY, 6)].mean() > 0.9


def test_dense_purple_tissue_next_to_blue_pen_is_kept():
    purple = ellipse((100, 100), (70, 60))
    pen = band((10, 165), (190, 165), 8)  # a marker line along the tissue's right edge, overlapping it
    tissue = purple & ~pen
    thumb = Canvas().paint(purple, PURPLE).paint(pen, BLUE_PEN, texture=4.0).thumb()

    tm = detect(thumb)

    assert abs(int(tm.mask[tissue].sum()) - int(tissue.sum())) <= 0.10 * tissue.sum()
    assert tm.mask[ellipse((100, 100), (55, 45))].all(), "purple tissue interior taken for ink"
    assert not tm.mask[pen].any()
    assert tm.pen_fraction == pytest.approx(pen.mean(), rel=0.25)


@pytest.mark.parametrize(
    "rgb",
    [PURPLE, (100, 60, 150), (150, 110, 190), (90, 50, 140), (170, 120, 200), (130, 70, 160)],
    ids=lambda c: "rgb{}-{}-{}".format(*c),
)
def test_haematoxylin_purples_are_not_ink(rgb):
    tissue = ellipse((100, 130), (70, 90))
    thumb = Canvas().paint(tissue, rgb).thumb()

    tm = detect(thumb)

    assert tm.pen_fraction < 0.001
    assert tm.mask[tissue].mean() > 0.95


@pytest.mark.parametrize(
    "rgb", [BLUE_PEN, (30, 60, 160), (60, 110, 210), (20, 90, 180)], ids=lambda c: "rgb{}-{}-{}".format(*c)
)
def test_blue_pen_shades_are_ink(rgb):
    thumb = Canvas().paint(STROKE, rgb, texture=4.0).thumb()

    tm = detect(thumb)

    assert tm.pen_fraction >= 0.9 * STROKE.mean()
    assert not tm.mask.any()


# --------------------------------------------------------------------------- empty slides


@pytest.mark.parametrize("noise", [0.0, 2.0, 4.0])
def test_empty_slide_has_no_tissue(noise):
    thumb = Canvas().thumb(noise=noise)

    tm = detect(thumb)

    assert not tm.mask.any()
    assert tm.threshold == pytest.approx(TissueConfig().saturation_floor)
    assert tm.area_mm2() == 0.0
    assert tm.polygons().is_empty and tm.polygons().geom_type == "MultiPolygon"


def test_pure_white_padding_and_one_pixel_thumbnail():
    assert not detect(np.full((50, 70, 3), 255, np.uint8)).mask.any()
    assert detect(np.full((1, 1, 3), 255, np.uint8)).mask.shape == (1, 1)


# --------------------------------------------------------------------------- small objects, holes


def test_small_objects_removed_small_holes_filled_large_holes_kept():
    # At 8 um/px the 20 000 um^2 limits are 312.5 px.
    tissue = disk((100, 90), 75)
    small_hole = disk((60, 90), 6)  # 113 px = 7 200 um^2
    large_hole = disk((120, 90), 20)  # 1 257 px = 80 400 um^2
    speck = disk((40, 220), 6)  # 113 px
    medium = disk((150, 215), 14)  # 613 px = 39 200 um^2
    assert small_hole.sum() * 64 < 20_000 < large_hole.sum() * 64
    canvas = Canvas().paint(tissue & ~small_hole & ~large_hole, PINK)
    thumb = canvas.paint(speck, PINK).paint(medium, PINK).thumb()

    tm = detect(thumb)

    assert not tm.mask[speck].any()
    assert tm.mask[medium].mean() > 0.9
    assert tm.mask[small_hole].all()
    assert not tm.mask[disk((120, 90), 17)].any()
    hole_px = int((~tm.mask[disk((120, 90), 25)]).sum())
    assert hole_px == pytest.approx(large_hole.sum(), rel=0.15)


def test_narrow_cracks_open_to_glass_are_closed():
    # Tears 4 px (32 um) wide cut from the edge into the tissue are not holes (they reach the
    # glass), and too wide for blur + median; the closing (radius 16 um = 2 px) bridges them.
    tissue = ellipse((100, 130), (70, 100))
    cracks = np.zeros(SHAPE, bool)
    for col in (70, 110, 150, 190):
        cracks[25:70, col : col + 4] = True
    thumb = Canvas().paint(tissue & ~cracks, PINK).thumb()

    tm = detect(thumb)
    inner = cracks & ellipse((100, 130), (62, 92))  # away from the mouth of each crack

    assert tm.mask[inner].mean() > 0.9
    assert abs(int(tm.mask.sum()) - int(tissue.sum())) <= 0.05 * tissue.sum()


def test_size_limits_follow_the_config():
    thumb = Canvas().paint(disk((100, 130), 14), PINK).thumb()  # ~39 000 um^2
    assert detect(thumb).mask.any()
    assert not detect(thumb, min_object_um2=60_000.0).mask.any()


# --------------------------------------------------------------------------- polygons


@pytest.mark.parametrize("rc", [(0, 0), (3, 7), (9, 2)])
@pytest.mark.parametrize("scale", [1.0, K, 16.0])
def test_single_pixel_polygon_is_its_level0_square(rc, scale):
    r, c = rc
    mask = np.zeros((10, 8), bool)
    mask[r, c] = True

    mp = mask_to_polygons(mask, scale=scale)

    assert mp.geom_type == "MultiPolygon" and len(mp.geoms) == 1
    assert mp.centroid.x == pytest.approx((c + 0.5) * scale)
    assert mp.centroid.y == pytest.approx((r + 0.5) * scale)
    assert mp.bounds == pytest.approx((c * scale, r * scale, (c + 1) * scale, (r + 1) * scale))
    assert mp.area == pytest.approx(scale**2)


def test_polygons_keep_holes_and_islands_in_holes():
    mask = np.zeros((12, 12), bool)
    mask[1:11, 1:11] = True
    mask[3:9, 3:9] = False  # 36 px hole
    mask[5:7, 5:7] = True  # 4 px island in the hole

    mp = mask_to_polygons(mask, scale=2.0)

    assert mp.is_valid and len(mp.geoms) == 2
    outer = max(mp.geoms, key=lambda p: p.area)
    assert len(outer.interiors) == 1
    assert shapely.Polygon(outer.interiors[0]).area == pytest.approx(36 * 4)
    assert mp.area == pytest.approx(mask.sum() * 4)


def test_diagonal_neighbours_and_pinched_holes_make_valid_polygons():
    mask = np.array(
        [[1, 0, 0, 1, 1], [0, 1, 0, 1, 1], [0, 0, 1, 0, 1], [1, 1, 1, 1, 1]],
        dtype=bool,
    )
    mp = mask_to_polygons(mask)
    assert mp.is_valid
    assert mp.area == pytest.approx(mask.sum())


@pytest.mark.parametrize("seed", range(3))
def test_random_masks_polygon_area_is_exact(seed):
    mask = np.random.default_rng(seed).random((30, 40)) < 0.45
    mp = mask_to_polygons(mask, scale=3.0)
    assert mp.is_valid
    assert mp.area == pytest.approx(mask.sum() * 9.0)


def test_empty_mask_gives_empty_multipolygon():
    mp = mask_to_polygons(np.zeros((5, 5), bool))
    assert mp.is_empty and mp.geom_type == "MultiPolygon"


def test_tissue_polygons_are_in_level0_pixels_with_holes():
    rect = np.zeros(SHAPE, bool)
    rect[50:150, 80:200] = True
    hole = disk((100, 140), 20)  # 80 000 um^2: kept
    thumb = Canvas().paint(rect & ~hole, PINK).thumb()
    tm = detect(thumb)

    mp = tm.polygons()

    assert mp.area == pytest.approx(tm.mask.sum() * K**2, rel=0.02)
    assert mp.area == pytest.approx((rect & ~hole).sum() * K**2, rel=0.05)
    assert sum(len(p.interiors) for p in mp.geoms) == 1
    # rows 50..149, cols 80..199 of the thumbnail -> x 80k..200k, y 50k..150k level-0 px
    assert mp.bounds == pytest.approx((80 * K, 50 * K, 200 * K, 150 * K), abs=1.01 * K)
    assert mp.centroid.x == pytest.approx(140 * K, abs=K)
    assert mp.centroid.y == pytest.approx(100 * K, abs=K)


# --------------------------------------------------------------------------- config and inputs


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"thumb_mpp": 0.0}, "thumb_mpp"),
        ({"thumb_mpp": -8.0}, "thumb_mpp"),
        ({"median_um": -1.0}, "median_um"),
        ({"closing_um": -16.0}, "closing_um"),
        ({"opening_um": float("nan")}, "opening_um"),
        ({"min_object_um2": -1.0}, "min_object_um2"),
        ({"min_hole_um2": -5.0}, "min_hole_um2"),
        ({"saturation_floor": 0.3, "saturation_ceiling": 0.2}, "saturation_floor"),
        ({"saturation_ceiling": 1.5}, "saturation_ceiling"),
        ({"saturation_floor": -0.1}, "saturation_floor"),
        ({"min_value": 2.0}, "min_value"),
        ({"pen_min_saturation": -0.5}, "pen_min_saturation"),
        ({"blue_pen_hue": (245.0, 180.0)}, "blue_pen_hue"),
        ({"green_pen_hue": (75.0, 400.0)}, "green_pen_hue"),
        ({"green_pen_hue": (75.0,)}, "green_pen_hue"),
        ({"suppress_pen": "yes"}, "suppress_pen"),
        ({"median_um": "24"}, "median_um"),
    ],
)
def test_invalid_config_raises_config_error_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field) as info:
        TissueConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_to_dict_is_json_and_round_trips():
    cfg = TissueConfig(thumb_mpp=16.0, blue_pen_hue=(190.0, 240.0), suppress_pen=False)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["thumb_mpp"] == 16.0 and d["blue_pen_hue"] == [190.0, 240.0]
    assert TissueConfig(**d) == cfg


def test_default_blue_window_stops_below_haematoxylin():
    lo, hi = TissueConfig().blue_pen_hue
    assert hi <= 245.0 and lo < 225.0 <= hi


@pytest.mark.parametrize(
    "bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 2), np.uint8), np.zeros((0, 5, 3), np.uint8)]
)
def test_bad_thumbnail_shape_raises(bad):
    with pytest.raises(ValueError, match="thumb_rgb"):
        detect_tissue(bad, l0_mpp=L0_MPP)


@pytest.mark.parametrize("l0_mpp", [0.0, -0.25, float("nan")])
def test_bad_l0_mpp_raises(l0_mpp):
    with pytest.raises(ValueError, match="l0_mpp"):
        detect_tissue(np.full((8, 8, 3), 240, np.uint8), l0_mpp=l0_mpp)


def test_float_and_rgba_thumbnails_give_the_same_mask():
    thumb, _ = _scene("pink")
    ref = detect(thumb).mask
    rgba = np.dstack([thumb, np.full(thumb.shape[:2], 255, np.uint8)])
    assert np.array_equal(detect(rgba).mask, ref)
    assert np.array_equal(detect(thumb.astype(np.float32) / 255).mask, ref)


def test_mask_is_read_only():
    tm = detect(Canvas().paint(disk((100, 130), 30), PINK).thumb())
    with pytest.raises(ValueError):
        tm.mask[0, 0] = True


def test_mask_to_polygons_old_import_path_still_works():
    import wsi_toolkit.geometry
    import wsi_toolkit.tissue

    assert wsi_toolkit.tissue.mask_to_polygons is wsi_toolkit.geometry.mask_to_polygons
