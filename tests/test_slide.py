"""Tests for wsi_toolkit.slide: opening, physical-scale reads, thumbnails, mpp, damaged files.

Every slide is written here with ``write_pyramidal_tiff`` from a pattern defined analytically in
MICROMETRES: grey-white glass with a red and a blue axis-aligned rectangle at known positions.
Each pyramid level is rendered from its own pixel centres, so every level is as sharp as level 0
and the truth of each test is the geometry drawn here, never the reader's own output.
JPEG blurs edges a little, so positions are measured on thresholded colour masks with a
tolerance of about 1.5 output pixels.
"""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_toolkit.errors import (
    ConfigError,
    MissingMppError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    WsiToolkitError,
)
from wsi_toolkit.slide import SLIDE_SUFFIXES, find_slides, open_slide
from wsi_toolkit.slide._metadata import mpp_from_openslide_properties, mpp_from_tiff_resolution
from wsi_toolkit.slide._reader import snap_downsample
from wsi_toolkit.synthetic import write_pyramidal_tiff

L0_SIZE = (2048, 1536)  # (w, h) level-0 px; 4 levels with tile 256 / min_level_size 256
TILE = 256
GLASS = (245, 245, 245)  # not 255, so "outside the slide" (255) is told apart from glass
RED = (220, 30, 30)
BLUE = (30, 40, 200)

# Rectangles (x, y, width, height) in micrometres from the slide's top-left corner. They fit in
# the smallest slide drawn here (2048 x 1536 px at 0.226 um/px = 462.8 x 347.1 um). The red one
# is 400 um wide: on a 0.226 um/px slide read at 0.972 um/px it is 411.5 px; read wrongly at
# level 2's own 0.904 um/px it would be 442.5 px.
RED_RECT_UM = (30.0, 30.0, 400.0, 100.0)
BLUE_RECT_UM = (100.0, 180.0, 120.0, 140.0)

SLIDE_MPPS = (0.243, 0.226, 0.5)
TARGET_MPPS = (0.243, 0.5, 0.972, 2.0, 8.0)
BACKENDS = ("openslide", "tifffile")


# Colour masks threshold half-way between the rectangle's colour and the glass in the channels
# that tell them apart (JPEG's chroma subsampling dims the blue of edge pixels, so blue's own
# channel is no use against white glass), so a blurred edge pixel counts when it is more than half covered and
# measured sizes are unbiased.


def red_mask(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (r > g + 60) & (g < (RED[1] + GLASS[1]) / 2) & (b < (RED[2] + GLASS[2]) / 2)


def blue_mask(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    return (b > r + 60) & (r < (BLUE[0] + GLASS[0]) / 2) & (g < (BLUE[1] + GLASS[1]) / 2)


def pattern_tiles(mpp: float):
    """``level_tiles`` for write_pyramidal_tiff: each pixel coloured by where its centre lies (um)."""

    def level_tiles(k: int, lvl_x: int, lvl_y: int, tile: int) -> np.ndarray:
        px_um = k * mpp
        xs_um = (np.arange(lvl_x, lvl_x + tile) + 0.5) * px_um
        ys_um = (np.arange(lvl_y, lvl_y + tile) + 0.5) * px_um
        out = np.empty((tile, tile, 3), np.uint8)
        out[:] = GLASS
        for (x, y, w, h), colour in ((RED_RECT_UM, RED), (BLUE_RECT_UM, BLUE)):
            inside = ((ys_um >= y) & (ys_um < y + h))[:, None] & ((xs_um >= x) & (xs_um < x + w))[None, :]
            out[inside] = colour
        return out

    return level_tiles


@pytest.fixture(scope="module")
def make_slide(tmp_path_factory):
    """``make_slide(mpp, flavour, l0_size=L0_SIZE) -> Path``; each slide is written once per module."""
    folder = tmp_path_factory.mktemp("pattern_slides")
    cache: dict = {}

    def make(mpp: float, flavour: str = "tiff", l0_size: tuple[int, int] = L0_SIZE):
        key = (mpp, flavour, l0_size)
        if key not in cache:
            path = folder / f"pattern_{mpp}_{flavour}_{l0_size[0]}x{l0_size[1]}.{'svs' if flavour == 'svs' else 'tif'}"
            write_pyramidal_tiff(path, pattern_tiles(mpp), l0_size=l0_size, mpp=mpp, flavour=flavour,
                                 tile=TILE, min_level_size=256)
            cache[key] = path
        return cache[key]

    return make


def open_pattern(make_slide, mpp, flavour, backend):
    path = make_slide(mpp, flavour)
    # The no-resolution TIFF needs the override; it is the same physical pattern.
    return open_slide(path, backend=backend, mpp=mpp if flavour == "tiff-nores" else None)


def measure(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(centre_x, centre_y, width, height) of a rectangle mask, in output px.

    The centre is in continuous coordinates (pixel i spans [i, i + 1)). Width and height are the
    median run lengths over the rows/columns that cross the rectangle's body, robust to the few
    blurred pixels on its edges.
    """
    assert mask.any(), "rectangle not found in the read"
    rows, cols = np.nonzero(mask)
    row_counts = mask.sum(axis=1)
    col_counts = mask.sum(axis=0)
    width = float(np.median(row_counts[row_counts > 0.5 * row_counts.max()]))
    height = float(np.median(col_counts[col_counts > 0.5 * col_counts.max()]))
    return cols.mean() + 0.5, rows.mean() + 0.5, width, height


def expected_px(rect_um, origin_um, target_mpp):
    """(centre_x, centre_y, width, height) of ``rect_um`` in output px of a read at ``target_mpp``."""
    x, y, w, h = rect_um
    return (
        (x + w / 2 - origin_um[0]) / target_mpp,
        (y + h / 2 - origin_um[1]) / target_mpp,
        w / target_mpp,
        h / target_mpp,
    )


def assert_rect_at(rgb, mask_fn, rect_um, origin_um, target_mpp, *, what=""):
    cx, cy, w, h = measure(mask_fn(rgb))
    ex, ey, ew, eh = expected_px(rect_um, origin_um, target_mpp)
    assert abs(cx - ex) <= 1.5 and abs(cy - ey) <= 1.5, f"{what}: centre {(cx, cy)} != {(ex, ey)}"
    assert abs(w - ew) <= 2 and abs(h - eh) <= 2, f"{what}: size {(w, h)} != {(ew, eh)}"


# --------------------------------------------------------------------------------------------
# 1. Physical-scale reads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_mpp", TARGET_MPPS)
@pytest.mark.parametrize("flavour", ["tiff", "svs", "tiff-nores"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slide_mpp", SLIDE_MPPS)
def test_read_at_mpp_puts_rectangles_at_physical_positions(make_slide, slide_mpp, backend, flavour, target_mpp):
    with open_pattern(make_slide, slide_mpp, flavour, backend) as slide:
        assert slide.mpp == pytest.approx(slide_mpp, rel=1e-6)
        # An integer and a fractional level-0 origin; the box reaches to (460, 340) um.
        for l0_xy in ((52, 36), (41.5, 17.25)):
            origin_um = (l0_xy[0] * slide_mpp, l0_xy[1] * slide_mpp)
            size_px = (int((460 - origin_um[0]) / target_mpp), int((340 - origin_um[1]) / target_mpp))
            rgb = slide.read_at_mpp(l0_xy, size_px, target_mpp)
            assert rgb.shape == (size_px[1], size_px[0], 3) and rgb.dtype == np.uint8
            what = f"{backend}/{flavour} {slide_mpp} um/px slide read at {target_mpp} from {l0_xy}"
            assert_rect_at(rgb, red_mask, RED_RECT_UM, origin_um, target_mpp, what="red " + what)
            assert_rect_at(rgb, blue_mask, BLUE_RECT_UM, origin_um, target_mpp, what="blue " + what)
            # Glass between the rectangles stays glass (no colour bleeding from a wrong level).
            gx, gy = (300 - origin_um[0]) / target_mpp, (250 - origin_um[1]) / target_mpp
            assert np.abs(rgb[int(gy), int(gx)].astype(int) - GLASS).max() <= 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_utrecht_slide_read_at_pcam_scale_is_true_0972_not_level2_0904(make_slide, backend):
    """0.226 um/px slide, 0.972 um/px wanted: level 2 (0.904) is read and shrunk by 7.5 %."""
    with open_slide(make_slide(0.226, "tiff"), backend=backend) as slide:
        assert slide.best_level_for_mpp(0.972) == 2
        assert slide.level_mpp(2) == pytest.approx(0.904, rel=1e-6)
        rgb = slide.read_at_mpp((0, 0), (476, 357), 0.972)
    _, _, width, height = measure(red_mask(rgb))
    assert abs(width - 400 / 0.972) <= 2  # 411.5 px
    assert abs(width - 400 / 0.904) > 25  # not 442.5 px
    assert abs(height - 100 / 0.972) <= 2


def test_read_finer_than_level0_upsamples(make_slide):
    with open_slide(make_slide(0.5, "tiff"), backend="tifffile") as slide:
        assert slide.best_level_for_mpp(0.25) == 0
        l0_xy = (100, 100)  # 50 um
        rgb = slide.read_at_mpp(l0_xy, (800, 600), 0.25)  # 200 x 150 um
    # The box covers x 50..250 um, y 50..200 um at 4 px/um. Blue (x 100..220, y 180..) ->
    # output cols 200..680, rows 520..; red (y ..130 um, all x) -> rows ..320.
    blue, red = blue_mask(rgb), red_mask(rgb)
    assert blue[522:, 202:678].all()
    assert not blue[:518].any() and not blue[:, :198].any() and not blue[:, 682:].any()
    assert red[:318].all()
    assert not red[322:].any()


# --------------------------------------------------------------------------------------------
# 2. The exact path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["tiff", "svs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_at_level_mpp_with_aligned_origin_is_the_level_pixels(make_slide, backend, flavour):
    with open_slide(make_slide(0.243, flavour), backend=backend) as slide:
        for l0_xy in ((0, 0), (64, 128), (1028, 516)):  # multiples of 4 = level-2 pixels
            got = slide.read_at_mpp(l0_xy, (300, 200), 0.972)
            want = slide.read_region(l0_xy, 2, (300, 200))
            np.testing.assert_array_equal(got, want)
        # Also at level 1 (0.486 um/px) and past the slide edge.
        np.testing.assert_array_equal(
            slide.read_at_mpp((2000, 1500), (64, 48), 0.486), slide.read_region((2000, 1500), 1, (64, 48))
        )


# --------------------------------------------------------------------------------------------
# 3. read_region
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_outside_the_slide_is_white(make_slide, backend):
    with open_slide(make_slide(0.243, "tiff"), backend=backend) as slide:
        w0, h0 = slide.dimensions
        inside = slide.read_region((0, 0), 0, (200, 150))
        top_left = slide.read_region((-100, -50), 0, (300, 200))
        assert (top_left[:50] == 255).all() and (top_left[:, :100] == 255).all()
        np.testing.assert_array_equal(top_left[50:, 100:], inside)
        # Bottom-right corner: 100 x 50 px inside, the rest outside.
        corner_inside = slide.read_region((w0 - 100, h0 - 50), 0, (100, 50))
        bottom_right = slide.read_region((w0 - 100, h0 - 50), 0, (300, 200))
        np.testing.assert_array_equal(bottom_right[:50, :100], corner_inside)
        assert (bottom_right[50:] == 255).all() and (bottom_right[:, 100:] == 255).all()
        # The inside part is glass (245), not the outside white.
        assert np.abs(corner_inside.astype(int) - GLASS).max() <= 8
        # Level 1: 64 level-0 px left of the slide = 32 level-1 px of white.
        lvl1 = slide.read_region((-64, 0), 1, (96, 64))
        assert (lvl1[:, :32] == 255).all()
        np.testing.assert_array_equal(lvl1[:, 32:], slide.read_region((0, 0), 1, (64, 64)))
        # Entirely outside.
        assert (slide.read_region((w0 + 10, 0), 0, (20, 10)) == 255).all()
        assert (slide.read_region((-500, -500), 2, (20, 10)) == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_content_and_array_layout(make_slide, backend):
    mpp = 0.243
    with open_slide(make_slide(mpp, "tiff"), backend=backend) as slide:
        for level in range(slide.level_count):
            ds = 2**level
            rgb = slide.read_region((0, 0), level, (int(470 / (mpp * ds)), int(340 / (mpp * ds))))
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            assert rgb.flags.c_contiguous
            assert_rect_at(rgb, red_mask, RED_RECT_UM, (0, 0), mpp * ds, what=f"level {level}")
        rgb = slide.read_region((10, 20), 0, (33, 17))
        assert rgb.shape == (17, 33, 3)


@pytest.mark.parametrize(
    "level, size",
    [(-1, (10, 10)), (4, (10, 10)), (99, (10, 10)), (0, (0, 10)), (0, (10, 0)), (1, (-5, 10)), (0, (10,))],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_rejects_bad_level_or_size(make_slide, backend, level, size):
    with open_slide(make_slide(0.243, "tiff"), backend=backend) as slide:
        assert slide.level_count == 4
        with pytest.raises(ConfigError):
            slide.read_region((0, 0), level, size)


@pytest.mark.parametrize("kwargs", [dict(size_px=(0, 5), mpp=1.0), dict(size_px=(5, -1), mpp=1.0),
                                    dict(size_px=(5, 5), mpp=0.0), dict(size_px=(5, 5), mpp=-1.0),
                                    dict(size_px=(5, 5), mpp=float("nan"))])
def test_read_at_mpp_rejects_bad_arguments(make_slide, kwargs):
    with open_slide(make_slide(0.243, "tiff"), backend="tifffile") as slide:
        with pytest.raises(ConfigError):
            slide.read_at_mpp((0, 0), **kwargs)


def test_resampled_reads_are_writeable_like_read_region(make_slide):
    with open_slide(make_slide(0.243, "tiff"), backend="tifffile") as slide:
        assert slide.read_region((0, 0), 0, (8, 8)).flags.writeable
        assert slide.read_at_mpp((0, 0), (8, 8), 0.972).flags.writeable  # exact path
        assert slide.read_at_mpp((1, 1), (8, 8), 0.5).flags.writeable  # resampled
        assert slide.thumbnail(mpp=8.0).flags.writeable


# --------------------------------------------------------------------------------------------
# 4. Thumbnail
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slide_mpp", SLIDE_MPPS)
def test_thumbnail_shape_and_geometry(make_slide, slide_mpp, backend):
    with open_slide(make_slide(slide_mpp, "tiff"), backend=backend) as slide:
        thumb = slide.thumbnail(mpp=8.0)
    w0, h0 = L0_SIZE
    assert thumb.shape == (math.ceil(h0 * slide_mpp / 8), math.ceil(w0 * slide_mpp / 8), 3)
    assert thumb.dtype == np.uint8
    assert_rect_at(thumb, red_mask, RED_RECT_UM, (0, 0), 8.0, what="thumbnail red")
    assert_rect_at(thumb, blue_mask, BLUE_RECT_UM, (0, 0), 8.0, what="thumbnail blue")


# --------------------------------------------------------------------------------------------
# 5. Backends agree
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("l0_size", [L0_SIZE, (2000, 1500)])
@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_backends_give_the_same_pixels(make_slide, flavour, l0_size):
    path = make_slide(0.243, flavour, l0_size)
    with open_slide(path, backend="openslide") as a, open_slide(path, backend="tifffile") as b:
        assert a.backend == "openslide" and b.backend == "tifffile"
        for level in range(a.level_count):
            ds = 2**level
            for l0_xy in ((0, 0), (ds * 37, ds * 23), (-ds * 5, ds * 3)):
                ra, rb = a.read_region(l0_xy, level, (200, 120)), b.read_region(l0_xy, level, (200, 120))
                assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2, (level, l0_xy)
        for target in TARGET_MPPS:
            ra, rb = a.read_at_mpp((13, 7.5), (150, 100), target), b.read_at_mpp((13, 7.5), (150, 100), target)
            assert np.abs(ra.astype(int) - rb.astype(int)).mean() < 2, target
        ta, tb = a.thumbnail(mpp=8.0), b.thumbnail(mpp=8.0)
        assert ta.shape == tb.shape and np.abs(ta.astype(int) - tb.astype(int)).mean() < 2


# --------------------------------------------------------------------------------------------
# 6. mpp discovery and override
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_mpp_from_tiff_resolution_tags(make_slide, backend):
    with open_slide(make_slide(0.243, "tiff"), backend=backend) as slide:
        assert slide.mpp == pytest.approx(0.243, rel=1e-6)
        assert slide.mpp_xy == pytest.approx((0.243, 0.243), rel=1e-6)
        assert slide.mpp_metadata == pytest.approx((0.243, 0.243), rel=1e-6)
        if slide.backend == "tifffile":
            assert "XResolution" in slide.mpp_source
        else:  # OpenSlide normalises the TIFF resolution tags into openslide.mpp-x
            assert slide.mpp_source == "openslide.mpp-x"
            assert slide.vendor == "generic-tiff"


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_mpp_from_aperio_description(make_slide, backend):
    with open_slide(make_slide(0.226, "svs"), backend=backend) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.226, rel=1e-6)
        if slide.backend == "tifffile":
            assert slide.mpp_source == "aperio.MPP"
        else:
            assert slide.mpp_source == "openslide.mpp-x"
            assert float(slide.properties["aperio.MPP"]) == pytest.approx(0.226)


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_no_resolution_metadata_raises_missing_mpp(make_slide, backend):
    path = make_slide(0.243, "tiff-nores")
    with pytest.raises(MissingMppError) as info:
        open_slide(path, backend=backend)
    assert isinstance(info.value, ValueError) and isinstance(info.value, WsiToolkitError)
    assert path.name in str(info.value) and "--mpp" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_override_wins_and_keeps_metadata(make_slide, backend, caplog):
    with caplog.at_level(logging.WARNING, logger="wsi_toolkit.slide"):
        slide = open_slide(make_slide(0.243, "tiff"), mpp=0.5, backend=backend)
    with slide:
        assert slide.mpp == 0.5 and slide.mpp_xy == (0.5, 0.5)
        assert slide.mpp_source == "override"
        assert slide.mpp_metadata == pytest.approx((0.243, 0.243), rel=1e-6)
        assert slide.level_mpp(2) == pytest.approx(2.0)
    assert any("override" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_override_on_file_without_metadata(make_slide, backend):
    with open_slide(make_slide(0.243, "tiff-nores"), mpp=0.243, backend=backend) as slide:
        assert slide.mpp == 0.243 and slide.mpp_source == "override" and slide.mpp_metadata is None
        rgb = slide.read_at_mpp((0, 0), (470, 350), 0.972)
    assert_rect_at(rgb, red_mask, RED_RECT_UM, (0, 0), 0.972)


@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.25, float("nan"), float("inf"), "0.5"])
def test_invalid_mpp_override_is_a_config_error(make_slide, bad):
    with pytest.raises(ConfigError):
        open_slide(make_slide(0.243, "tiff"), mpp=bad)


@pytest.mark.parametrize("value", [np.float32(0.243), np.int64(1)], ids=["float32", "int64"])
def test_numpy_scalar_mpp_override_is_accepted(make_slide, value):
    with open_slide(make_slide(0.243, "tiff-nores"), mpp=value) as slide:
        assert slide.mpp == pytest.approx(float(value)) and slide.mpp_source == "override"


def test_unknown_backend_is_a_config_error(make_slide):
    with pytest.raises(ConfigError):
        open_slide(make_slide(0.243, "tiff"), backend="bioformats")


@pytest.mark.parametrize(
    "x_res, y_res, unit, want",
    [
        (25_400 / 0.25, 25_400 / 0.25, 2, (0.25, 0.25)),  # inch
        (1e4 / 0.243, 1e4 / 0.243, 3, (0.243, 0.243)),  # centimetre
        (1e4 / 0.226, 1e4 / 0.25, 3, (0.226, 0.25)),  # non-square pixels
        (1000 / 0.5, 1000 / 0.5, 4, (0.5, 0.5)),  # millimetre
        (2.0, 2.0, 5, (0.5, 0.5)),  # micrometre
        (4.0, None, 5, (0.25, 0.25)),  # y defaults to x
        (1e4 / 0.243, 1e4 / 0.243, "centimeter", (0.243, 0.243)),
        (25_400 / 0.5, 25_400 / 0.5, "INCH", (0.5, 0.5)),
        (1e4 / 0.243, 1e4 / 0.243, "3", (0.243, 0.243)),
        (1e4 / 0.243, 1e4 / 0.243, 1, None),  # unit "none": no physical meaning
        (1e4 / 0.243, 1e4 / 0.243, "none", None),
        (1e4 / 0.243, 1e4 / 0.243, None, None),
        (None, None, 3, None),
        (1.0, 1.0, 3, None),  # tifffile's default 1 px/cm = 10 mm/px: implausible
        (1.0, 1.0, 2, None),
        (0.0, 0.0, 3, None),
    ],
)
def test_mpp_from_tiff_resolution_units(x_res, y_res, unit, want):
    got = mpp_from_tiff_resolution(x_res, y_res, unit)
    if want is None:
        assert got is None
    else:
        assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "props, want",
    [
        ({"openslide.mpp-x": "0.2430", "openslide.mpp-y": "0.2431", "aperio.MPP": "0.5"},
         ((0.243, 0.2431), "openslide.mpp-x")),
        ({"openslide.mpp-x": "0.226"}, ((0.226, 0.226), "openslide.mpp-x")),
        ({"aperio.MPP": "0.2527"}, ((0.2527, 0.2527), "aperio.MPP")),
        ({"aperio.MPP": "0,2527"}, ((0.2527, 0.2527), "aperio.MPP")),  # decimal comma
        ({"openslide.mpp-x": "garbage", "aperio.MPP": "0.5"}, ((0.5, 0.5), "aperio.MPP")),
        ({"tiff.XResolution": str(1e4 / 0.243), "tiff.YResolution": str(1e4 / 0.243),
          "tiff.ResolutionUnit": "centimeter"}, ((0.243, 0.243), "tiff.XResolution (centimeter)")),
        ({"tiff.XResolution": "1", "tiff.YResolution": "1", "tiff.ResolutionUnit": "none"}, None),
        ({"openslide.mpp-x": "0", "aperio.MPP": "-1"}, None),
        ({}, None),
    ],
)
def test_mpp_from_openslide_properties(props, want):
    got = mpp_from_openslide_properties(props)
    if want is None:
        assert got is None
    else:
        assert got[0] == pytest.approx(want[0], rel=1e-9) and got[1] == want[1]


# --------------------------------------------------------------------------------------------
# 7. Missing and damaged inputs
# --------------------------------------------------------------------------------------------

ALL_BACKENDS = ("auto", "openslide", "tifffile")


def assert_open_fails(path, backend, error, *words):
    with pytest.raises(error) as info:
        open_slide(path, backend=backend)
    message = str(info.value)
    assert path.name in message, message
    for w in words:
        assert w in message, message
    return info.value


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_file(tmp_path, backend):
    err = assert_open_fails(tmp_path / "no_such_slide.tif", backend, SlideNotFoundError)
    assert isinstance(err, FileNotFoundError)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_folder_is_not_a_slide(tmp_path, backend):
    folder = tmp_path / "slides.tif"
    folder.mkdir()
    assert_open_fails(folder, backend, SlideNotFoundError)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_file(tmp_path, backend):
    path = tmp_path / "empty.tif"
    path.touch()
    assert_open_fails(path, backend, SlideFormatError)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_text_file_named_tif(tmp_path, backend):
    path = tmp_path / "notes.tif"
    path.write_text("this is not a slide\n" * 20)
    assert_open_fails(path, backend, SlideFormatError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_plain_picture_renamed_tif(tmp_path, backend, fmt):
    # Neither OpenSlide nor tifffile reads a PNG/JPEG: the error says it is not a slide.
    path = tmp_path / f"picture_{fmt}.tif"
    Image.new("RGB", (64, 48), (200, 100, 150)).save(path, format=fmt)
    err = assert_open_fails(path, backend, SlideFormatError)
    assert not isinstance(err, SlideReadError)


@pytest.mark.parametrize("fraction", [0.05, 0.6, 0.9])
@pytest.mark.parametrize("flavour", ["tiff", "svs"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_truncated_slide(make_slide, tmp_path, backend, flavour, fraction):
    data = make_slide(0.243, flavour).read_bytes()
    path = tmp_path / f"truncated.{flavour}"
    path.write_bytes(data[: int(len(data) * fraction)])
    err = assert_open_fails(path, backend, SlideReadError, "truncated")
    assert isinstance(err, OSError)


def structural_cut(path, where: str) -> int:
    """A byte count at which to cut ``path``, placed relative to the file's TIFF structure."""
    with tifffile.TiffFile(path) as tif:
        ifd_offsets = [page.offset for page in tif.pages]
        page0 = tif.pages[0]
        if where == "inside-ifd0-tile-offsets":  # IFD 0 complete, its TileOffsets array cut
            return page0.tags["TileOffsets"].valueoffset + 8
        if where == "end-of-level0-data":  # level 0 complete; IFD 1 and the other levels missing
            return max(o + c for o, c in zip(page0.dataoffsets, page0.databytecounts))
        if where == "inside-ifd1":
            return ifd_offsets[1] + 10
        if where == "inside-last-ifd":
            return ifd_offsets[-1] + 10
    raise ValueError(where)


# Cuts at the TIFF structure, each once a bug: tifffile silently drops tags past EOF, stops the
# directory chain at a bad next-IFD offset (a 1-level "pyramid"), or raises a bare TiffFileError.
STRUCTURAL_CUTS = ["inside-ifd0-tile-offsets", "end-of-level0-data", "inside-ifd1", "inside-last-ifd"]


@pytest.mark.parametrize(
    "where", STRUCTURAL_CUTS
)
@pytest.mark.parametrize("flavour", ["tiff", "svs"])
@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_truncated_slide_at_structural_boundaries(make_slide, tmp_path, backend, flavour, where):
    """Cuts at or inside the TIFF directories, not only inside pixel data: still 'truncated'."""
    src = make_slide(0.243, flavour)
    path = tmp_path / f"cut_{where}.{flavour}"
    path.write_bytes(src.read_bytes()[: structural_cut(src, where)])
    with pytest.raises(SlideReadError) as info:
        with open_slide(path, backend=backend) as slide:
            slide.thumbnail(mpp=8.0)
            slide.read_region((0, 0), 0, (16, 16))
    assert path.name in str(info.value) and "truncated" in str(info.value)


@pytest.mark.parametrize("where", STRUCTURAL_CUTS)
@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_truncated_slide_openslide_refuses_structural_cuts(make_slide, tmp_path, flavour, where):
    # OpenSlide does not recognise any of these files: a SlideFormatError naming the file.
    src = make_slide(0.243, flavour)
    path = tmp_path / f"cut_{where}.{flavour}"
    path.write_bytes(src.read_bytes()[: structural_cut(src, where)])
    assert_open_fails(path, "openslide", (SlideFormatError, SlideReadError))


def garble_level0_tile(src, dst, tile_index: int, *, keep_header: bool) -> None:
    """Copy ``src`` to ``dst`` with the bytes of one level-0 tile overwritten by random garbage."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset, count = tif.pages[0].dataoffsets[tile_index], tif.pages[0].databytecounts[tile_index]
    start = offset + (count // 2 if keep_header else 0)
    data[start : offset + count] = np.random.default_rng(7).integers(0, 256, offset + count - start,
                                                                       dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


# Tile 13 of level 0 = tile row 1, column 5 (8 tiles across): level-0 px x 1280..1535, y 256..511.
DAMAGED_TILE, DAMAGED_L0_XY = 13, (1280 + 10, 256 + 10)


@pytest.mark.parametrize("keep_header", [False, True], ids=["whole-tile", "tail-of-tile"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_garbage_tile_data_raises_on_read(make_slide, tmp_path, backend, keep_header):
    path = tmp_path / "garbled.tif"
    garble_level0_tile(make_slide(0.243, "tiff"), path, DAMAGED_TILE, keep_header=keep_header)
    with open_slide(path, backend=backend) as slide:  # directories are intact: opening works
        # Coarser levels are intact, so the thumbnail is fine.
        assert_rect_at(slide.thumbnail(mpp=8.0), red_mask, RED_RECT_UM, (0, 0), 8.0)
        # A level-0 region away from the damaged tile is fine.
        assert slide.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)
        with pytest.raises(SlideReadError) as info:
            slide.read_region(DAMAGED_L0_XY, 0, (64, 64))
        assert path.name in str(info.value)
        with pytest.raises(SlideReadError):
            slide.read_at_mpp(DAMAGED_L0_XY, (64, 64), 0.243)
        if slide.backend == "tifffile":
            # tifffile decodes tile by tile: the intact tiles remain readable after the error.
            assert slide.read_region((0, 0), 0, (256, 256)).shape == (256, 256, 3)
        # (OpenSlide goes into a sticky error state after a decode error: every later read of
        # that handle raises SlideReadError too, which is OpenSlide's documented behaviour.)


# --------------------------------------------------------------------------------------------
# 8. find_slides
# --------------------------------------------------------------------------------------------


def test_find_slides_expands_folders_and_keeps_files(tmp_path):
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("c.TIFF", "a.tif", "b.svs", "d.ndpi", "notes.txt", "a.xml", "thumb.png", ".a.tif.partial"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.tif").mkdir()  # a folder with a slide suffix is not a slide
    (folder / "sub.tif" / "deep.tif").write_bytes(b"x")  # not recursive
    single = tmp_path / "single.svs"
    single.write_bytes(b"x")
    other = tmp_path / "whatever.txt"  # files given explicitly are kept as given
    missing = tmp_path / "missing.tif"  # ... even when missing: open_slide reports it later
    got = find_slides([single, folder, str(other), missing])
    assert got == [single, folder / "a.tif", folder / "b.svs", folder / "c.TIFF", folder / "d.ndpi", other, missing]
    assert find_slides([tmp_path / "batch" / "sub.tif"]) == [folder / "sub.tif" / "deep.tif"]
    assert find_slides([]) == []
    assert ".tif" in SLIDE_SUFFIXES and ".svs" in SLIDE_SUFFIXES


# --------------------------------------------------------------------------------------------
# 9. Levels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "l0_size, want_dims",
    [
        (L0_SIZE, [(2048, 1536), (1024, 768), (512, 384), (256, 192)]),
        ((2000, 1500), [(2000, 1500), (1000, 750), (500, 375), (250, 188)]),
        ((2047, 1531), [(2047, 1531), (1024, 766), (512, 383), (256, 192)]),
    ],
)
@pytest.mark.parametrize("flavour", ["tiff", "svs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_halve_with_exact_integer_downsamples(make_slide, backend, flavour, l0_size, want_dims):
    with open_slide(make_slide(0.243, flavour, l0_size), backend=backend) as slide:
        assert slide.dimensions == l0_size
        assert list(slide.level_dimensions) == want_dims
        assert slide.level_downsamples == (1.0, 2.0, 4.0, 8.0)
        assert [slide.level_mpp(i) for i in range(4)] == pytest.approx([0.243, 0.486, 0.972, 1.944])


@pytest.mark.parametrize(
    "slide_mpp, target, want_level",
    [
        (0.243, 0.243, 0), (0.243, 0.1, 0), (0.243, 0.3, 0), (0.243, 0.485, 0), (0.243, 0.486, 1),
        (0.243, 0.5, 1), (0.243, 0.971, 1), (0.243, 0.972, 2), (0.243, 1.5, 2), (0.243, 1.944, 3),
        (0.243, 8.0, 3), (0.226, 0.9, 1), (0.226, 0.904, 2), (0.226, 0.972, 2), (0.226, 1.8, 2),
        (0.5, 0.972, 0), (0.5, 1.0, 1), (0.5, 2.0, 2), (0.5, 8.0, 3),
    ],
)
def test_best_level_for_mpp(make_slide, slide_mpp, target, want_level):
    with open_slide(make_slide(slide_mpp, "tiff"), backend="tifffile") as slide:
        assert slide.best_level_for_mpp(target) == want_level


def test_best_level_for_mpp_rejects_non_positive(make_slide):
    with open_slide(make_slide(0.243, "tiff"), backend="tifffile") as slide:
        with pytest.raises(ConfigError):
            slide.best_level_for_mpp(0)


@pytest.mark.parametrize(
    "l0_size, lvl_size, want",
    [((2048, 1536), (256, 192), 8.0), ((2000, 1500), (250, 188), 8.0), ((2047, 1531), (1024, 766), 2.0),
     ((1000, 1000), (300, 300), 10 / 3)],
)
def test_snap_downsample(l0_size, lvl_size, want):
    assert snap_downsample(l0_size, lvl_size) == pytest.approx(want)


def test_reader_repr_and_context_manager(make_slide, tmp_path):
    path = tmp_path / "copy.tif"
    shutil.copy(make_slide(0.243, "tiff"), path)
    with open_slide(path, backend="tifffile") as slide:
        text = repr(slide)
    assert "copy.tif" in text and "2048x1536" in text and "0.2430" in text


def test_ome_tiff_pyramid_in_subifds_reads_through_tifffile(tmp_path):
    # OME-TIFF keeps its pyramid in SubIFDs; OpenSlide would see one level and no mpp.
    a = np.full((1024, 1536, 3), 240, np.uint8)
    a[200:400, 500:800] = (200, 30, 30)  # red box: x 500..800, y 200..400 (level-0 px)
    path = tmp_path / "slide.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(a, subifds=2, tile=(256, 256), compression="zlib", photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25,
                           "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"})
        for k in (2, 4):
            tw.write(a[::k, ::k], subfiletype=1, tile=(256, 256), compression="zlib", photometric="rgb")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.vendor == "ome"
        assert slide.mpp == pytest.approx(0.25) and "OME" in slide.mpp_source
        assert slide.level_dimensions == ((1536, 1024), (768, 512), (384, 256))
        assert slide.best_level_for_mpp(1.0) == 2
        patch = slide.read_at_mpp((500, 200), (75, 50), 1.0)  # the red box at 1 um/px = 75 x 50 px
    assert (np.abs(patch.astype(int) - (200, 30, 30)) <= 2).all()


def _pyramid_with_size(tmp_path, name, l0_size):
    w, h = l0_size

    def tiles(k, lvl_x, lvl_y, tile):
        return np.full((tile, tile, 3), 200, np.uint8)

    path = tmp_path / name
    write_pyramidal_tiff(path, tiles, l0_size=l0_size, mpp=0.25, tile=256, min_level_size=256)
    return path


def test_auto_backend_prefers_pixel_exact_reads(tmp_path):
    # 2048 x 1024: every level halves exactly -> OpenSlide's downsamples are integers, it reads.
    exact = _pyramid_with_size(tmp_path, "exact.tif", (2048, 1024))
    with open_slide(exact) as slide:
        assert slide.backend == "openslide"
    # 2049 x 1023: level sizes are rounded, OpenSlide's downsamples become e.g. 1.9995: tifffile reads.
    rounded = _pyramid_with_size(tmp_path, "rounded.tif", (2049, 1023))
    with open_slide(rounded) as slide:
        assert slide.backend == "tifffile"
        assert slide.level_downsamples[:3] == (1.0, 2.0, 4.0)
    with open_slide(rounded, backend="openslide") as slide:  # still available when asked for
        assert slide.backend == "openslide"


def test_tifffile_tile_cache_decodes_each_tile_once(make_slide, monkeypatch):
    from wsi_toolkit.slide._tifffile import TiffFileReader

    with open_slide(make_slide(0.243, "tiff"), backend="tifffile") as slide:
        calls = []
        real = TiffFileReader._decode_segment

        def spy(self, page, index, *args):
            calls.append(index)
            return real(self, page, index, *args)

        monkeypatch.setattr(TiffFileReader, "_decode_segment", spy)
        first = slide.read_region((0, 0), 0, (300, 300))  # 2 x 2 tiles of 256
        again = slide.read_region((10, 10), 0, (290, 290))
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 4
    assert np.array_equal(first[10:, 10:], again)


# --------------------------------------------------------------------------------------------
# 10. Issue 11: bounds (mpp range, slide extent, strip size) and the block-wise thumbnail
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1e-6, 0.049, 20.5, 50])
def test_mpp_override_outside_physical_range(make_slide, bad):
    with pytest.raises(ConfigError, match=r"\[0.05, 20\] um/px"):
        open_slide(make_slide(0.243, "tiff"), mpp=bad)


def test_metadata_mpp_outside_physical_range_asks_for_override(tmp_path):
    path = tmp_path / "dpi72.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     resolution=(72, 72), resolutionunit="INCH", metadata=None)  # 352.8 um/px
    with pytest.raises(SlideFormatError, match=r"352.8.*--mpp"):
        open_slide(path, backend="tifffile")
    with open_slide(path, backend="tifffile", mpp=0.25) as slide:
        assert slide.mpp == 0.25


def test_slide_longer_than_any_glass_is_refused(make_slide):
    # 2048 px at 20 um/px is 41 mm: fine. The same header read at 0.25 um/px would be fine too;
    # what is refused is > 130 mm (checked here through the extent rule with a fake reader size).
    with open_slide(make_slide(0.243, "tiff"), mpp=20) as slide:
        assert slide.dimensions == L0_SIZE
    from wsi_toolkit.errors import SlideTooLargeError
    from wsi_toolkit.slide import _check_extent

    with open_slide(make_slide(0.243, "tiff")) as slide:
        slide.levels = (type(slide.levels[0])(size=(600_000, 1000), downsample=1.0),)
        with pytest.raises(SlideTooLargeError, match=r"146 mm"):
            _check_extent(slide)


def test_single_strip_of_a_huge_image_is_refused(tmp_path):
    from test_limits import write_raw_tiff

    from wsi_toolkit.errors import SlideTooLargeError

    path = write_raw_tiff(tmp_path / "strip.tif", 20_000, 20_000, mpp=0.25)  # one 1.1 GiB strip
    with pytest.raises(SlideTooLargeError, match=r"strips of 20,000 x 20,000 px") as info:
        open_slide(path, backend="tifffile")
    assert isinstance(info.value, SlideFormatError) and "vips" in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail_in_blocks_matches_one_read(make_slide, backend, monkeypatch):
    """Block-wise thumbnails (memory O(thumbnail)) give the pixels of one whole read."""
    import wsi_toolkit.slide._reader as reader_mod

    with open_slide(make_slide(0.243, "tiff"), backend=backend) as slide:
        whole = slide.thumbnail(mpp=2.0)  # one block
        monkeypatch.setattr(reader_mod, "_THUMB_BLOCK_PX", 64)  # many blocks, on a level 2 ds 4 -> 64 px
        blocks = slide.thumbnail(mpp=2.0)
    assert blocks.shape == whole.shape
    assert np.abs(blocks.astype(int) - whole.astype(int)).max() <= 1


def test_thumbnail_mpp_and_size_are_bounded(make_slide):
    with open_slide(make_slide(0.243, "tiff")) as slide:
        for bad in (0.0, 1e-6, 1e6, float("nan")):
            with pytest.raises(ConfigError, match="thumbnail mpp"):
                slide.thumbnail(mpp=bad)


def test_decode_tiles_finds_a_damaged_tile(make_slide, tmp_path):
    path = tmp_path / "garbled.tif"
    garble_level0_tile(make_slide(0.243, "tiff"), path, DAMAGED_TILE, keep_header=False)
    with open_slide(path, backend="tifffile") as slide:
        slide.decode_tiles(0, [(0, 0), (1, 0)])
        with pytest.raises(SlideReadError):
            slide.decode_tiles(0, [(DAMAGED_TILE % 8, DAMAGED_TILE // 8)])
