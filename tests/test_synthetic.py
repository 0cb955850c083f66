"""Tests for wsi_toolkit.synthetic: specimens in micrometres rendered into real slide files.

The truth of these tests is the specimen (its blobs, in micrometres) and the request made to
``make_spec``; the files are read back through the toolkit's own readers (slide, ASAP XML) and
tifffile, so a rendering or scaling mistake in either shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import shapely.affinity
import tifffile

from wsi_toolkit.annotations import is_tumor_group, read_asap_xml, tumor_region
from wsi_toolkit.errors import ConfigError, MissingMppError
from wsi_toolkit.slide import open_slide
from wsi_toolkit.synthetic import (
    SYNTHETIC_LABEL,
    make_spec,
    write_pyramidal_tiff,
    write_synthetic_slide,
)

TISSUE_MM2 = 0.6
TILE = 256
PCAM_MPP = 0.972

# (mpp, flavour) of the slides written once for the module: every flavour at Radboudumc's
# 0.243 um/px, and the same specimen as a Utrecht 0.226 um/px TIFF.
SLIDES = [(0.243, "tiff"), (0.243, "svs"), (0.243, "tiff-nores"), (0.226, "tiff")]


@pytest.fixture(scope="module")
def spec():
    return make_spec(tissue_mm2=TISSUE_MM2)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, spec):
    folder = tmp_path_factory.mktemp("synthetic")
    out = {}
    for mpp, flavour in SLIDES:
        suffix = "svs" if flavour == "svs" else "tif"
        out[mpp, flavour] = write_synthetic_slide(folder / f"specimen_{mpp}_{flavour}.{suffix}", spec, mpp=mpp,
                                                  flavour=flavour, tile=TILE)
    return out


def open_synthetic(s, **kwargs):
    return open_slide(s.path, mpp=s.mpp if s.flavour == "tiff-nores" else None, **kwargs)


def to_um(geom, mpp):
    return shapely.affinity.scale(geom, mpp, mpp, origin=(0, 0))


def same_region(a, b, rel):
    return a.symmetric_difference(b).area <= rel * max(a.area, b.area)


slide_ids = [f"{m}-{f}" for m, f in SLIDES]


# --------------------------------------------------------------------------------------------
# The specimen
# --------------------------------------------------------------------------------------------


def test_make_spec_is_deterministic_and_validated():
    assert make_spec(tissue_mm2=TISSUE_MM2, seed=3) == make_spec(tissue_mm2=TISSUE_MM2, seed=3)
    assert make_spec(tissue_mm2=TISSUE_MM2, seed=3) != make_spec(tissue_mm2=TISSUE_MM2, seed=4)
    for bad in (0, -1.0):
        with pytest.raises(ConfigError):
            make_spec(tissue_mm2=bad)


@pytest.mark.parametrize("kwargs", [dict(), dict(faint=False, pen=False), dict(n_tumors=3, seed=5)])
def test_spec_tissue_area_and_tumors_inside(kwargs):
    spec = make_spec(tissue_mm2=TISSUE_MM2, **kwargs)
    assert spec.tissue_um().area / 1e6 == pytest.approx(TISSUE_MM2, rel=0.05)
    tumor = spec.tumor_um()
    assert not tumor.is_empty
    assert tumor.difference(spec.tissue_um()).area < 1e-6 * tumor.area
    # Everything drawn lies on the slide.
    w, h = spec.size_um
    slide_box = shapely.box(0, 0, w, h)
    assert slide_box.contains(spec.tissue_um())
    for stroke in spec.pen:
        assert slide_box.contains(stroke.geometry_um())


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SLIDES, ids=slide_ids)
def test_file_opens_at_the_right_scale(slides, spec, key):
    s = slides[key]
    mpp, flavour = key
    want_l0 = (math.ceil(spec.size_um[0] / mpp), math.ceil(spec.size_um[1] / mpp))
    assert s.level0_size == want_l0 and s.mpp == mpp and s.flavour == flavour
    if flavour == "tiff-nores":
        with pytest.raises(MissingMppError):
            open_slide(s.path)
    for backend in ("openslide", "tifffile"):
        with open_synthetic(s, backend=backend) as slide:
            assert slide.dimensions == want_l0
            assert slide.mpp == pytest.approx(mpp, rel=1e-6)
            assert (slide.mpp_source == "override") == (flavour == "tiff-nores")
            assert (slide.mpp_metadata is None) == (flavour == "tiff-nores")
            assert slide.level_count >= 4
            assert slide.level_downsamples == tuple(2.0**i for i in range(slide.level_count))
            assert slide.vendor == ("aperio" if flavour == "svs" else "generic-tiff")


@pytest.mark.parametrize("key", SLIDES, ids=slide_ids)
def test_truth_geometry(slides, spec, key):
    s = slides[key]
    assert s.tissue_mm2 == pytest.approx(TISSUE_MM2, rel=0.05)
    assert s.tumor_mm2 > 0.005
    assert s.tumor_l0.difference(s.tissue_l0).area < 1e-6 * s.tumor_l0.area
    # Level-0 truth = the specimen in micrometres divided by mpp.
    assert same_region(to_um(s.tissue_l0, s.mpp), spec.tissue_um(), 1e-9)
    assert same_region(to_um(s.tumor_l0, s.mpp), spec.tumor_um(), 1e-9)
    w0, h0 = s.level0_size
    assert shapely.box(0, 0, w0, h0).contains(s.tissue_l0)


@pytest.mark.parametrize("key", SLIDES, ids=slide_ids)
def test_asap_xml_holds_the_tumor_truth(slides, key):
    s = slides[key]
    assert s.xml_path == s.path.with_suffix(".xml") and s.xml_path.is_file()
    annotations = read_asap_xml(s.xml_path)
    assert annotations and all(is_tumor_group(a.group) for a in annotations)
    got = shapely.union_all([a.polygon for a in annotations])
    assert same_region(got, s.tumor_l0, 0.01)
    assert same_region(tumor_region(annotations), s.tumor_l0, 0.01)


@pytest.mark.parametrize("key", SLIDES, ids=slide_ids)
def test_files_are_labelled_synthetic(slides, key):
    s = slides[key]
    with tifffile.TiffFile(s.path) as tif:
        assert "SYNTHETIC" in tif.pages[0].description
        if s.flavour == "svs":
            assert tif.pages[0].description.startswith("Aperio")
            assert "SYNTHETIC" in tif.pages[1].description  # the thumbnail page
    for backend in ("openslide", "tifffile"):
        with open_synthetic(s, backend=backend) as slide:
            assert "SYNTHETIC" in slide.properties.get("tiff.ImageDescription", "")
    assert "SYNTHETIC" in SYNTHETIC_LABEL


# --------------------------------------------------------------------------------------------
# The pixels
# --------------------------------------------------------------------------------------------


def _points_um(spec):
    """A point deep inside a tumour, one in normal tissue far from any tumour, one on glass (um)."""
    tumor = spec.tumor_um().buffer(-25)
    tumor = max(getattr(tumor, "geoms", [tumor]), key=lambda g: g.area)
    normal = shapely.union_all([b.polygon_um() for b in spec.tissue])
    normal = normal.difference(spec.tumor_um().buffer(80)).buffer(-40)
    normal = max(getattr(normal, "geoms", [normal]), key=lambda g: g.area)
    glass = (150.0, 150.0)  # make_spec leaves a 600 um margin around the tissue
    assert not spec.tissue_um().buffer(100).contains(shapely.Point(glass))
    return tumor.representative_point().coords[0], normal.representative_point().coords[0], glass


def _patch_mean(slide, point_um, *, size_px=32, mpp=PCAM_MPP):
    half_um = size_px * mpp / 2
    l0_xy = ((point_um[0] - half_um) / slide.mpp, (point_um[1] - half_um) / slide.mpp)
    return slide.read_at_mpp(l0_xy, (size_px, size_px), mpp).reshape(-1, 3).astype(float).mean(axis=0)


@pytest.mark.parametrize("key", SLIDES, ids=slide_ids)
def test_tumor_is_more_purple_than_normal_tissue_and_glass_is_white(slides, spec, key):
    tumor_pt, normal_pt, glass_pt = _points_um(spec)
    with open_synthetic(slides[key]) as slide:
        tumor, normal, glass = (_patch_mean(slide, p) for p in (tumor_pt, normal_pt, glass_pt))
    assert tumor[0] < normal[0] - 15  # less red
    assert tumor.sum() < normal.sum() - 30  # darker
    assert tumor[2] > tumor[1] + 30  # purple: blue well above green
    assert normal[0] > normal[1] + 20  # eosin pink: red above green
    assert glass.min() > 230 and np.ptp(glass) < 10  # near white, no tint


@pytest.mark.parametrize("key", [(0.243, "tiff"), (0.226, "tiff")], ids=["0.243", "0.226"])
def test_rendered_tissue_matches_truth(slides, spec, key):
    """Non-glass pixels of an 8 um/px thumbnail coincide with tissue + pen strokes."""
    s = slides[key]
    thumb_mpp = 8.0
    with open_synthetic(s) as slide:
        thumb = slide.thumbnail(mpp=thumb_mpp)
    drawn = thumb[..., 1] < 234  # glass has G ~242, faint tissue ~224, everything else lower
    rows, cols = np.mgrid[: thumb.shape[0], : thumb.shape[1]]
    truth_um = shapely.union_all([spec.tissue_um(), *[p.geometry_um() for p in spec.pen]])
    truth = shapely.contains_xy(truth_um, (cols + 0.5) * thumb_mpp, (rows + 0.5) * thumb_mpp)
    iou = (drawn & truth).sum() / (drawn | truth).sum()
    assert iou > 0.9, iou
    # Tissue alone (pen strokes lie below it): area from pixels ~ truth area.
    tissue_truth = shapely.contains_xy(spec.tissue_um(), (cols + 0.5) * thumb_mpp, (rows + 0.5) * thumb_mpp)
    tissue_rows = rows < (spec.tissue_um().bounds[3] + 100) / thumb_mpp
    drawn_mm2 = (drawn & tissue_rows).sum() * thumb_mpp**2 / 1e6
    assert drawn_mm2 == pytest.approx(tissue_truth.sum() * thumb_mpp**2 / 1e6, rel=0.05)
    assert drawn_mm2 == pytest.approx(TISSUE_MM2, rel=0.08)


# --------------------------------------------------------------------------------------------
# One specimen, two scanners
# --------------------------------------------------------------------------------------------


def test_same_spec_at_two_resolutions(slides):
    a, b = slides[0.243, "tiff"], slides[0.226, "tiff"]
    assert a.spec == b.spec
    # The truth in micrometres is identical ...
    assert same_region(to_um(a.tissue_l0, a.mpp), to_um(b.tissue_l0, b.mpp), 1e-9)
    assert same_region(to_um(a.tumor_l0, a.mpp), to_um(b.tumor_l0, b.mpp), 1e-9)
    assert a.tissue_mm2 == pytest.approx(b.tissue_mm2, rel=1e-9)
    # ... so in level-0 px it scales by the ratio of the pixel sizes.
    ratio = a.mpp / b.mpp  # 0.243 / 0.226: the Utrecht slide has 7.5 % more px per um
    assert b.tumor_l0.area == pytest.approx(a.tumor_l0.area * ratio**2, rel=1e-9)
    ca, cb = a.tumor_l0.centroid, b.tumor_l0.centroid
    assert (cb.x, cb.y) == pytest.approx((ca.x * ratio, ca.y * ratio), rel=1e-9)
    assert b.level0_size[0] == pytest.approx(a.level0_size[0] * ratio, abs=1.5)
    # And read at the same physical scale, the two files show the same picture.
    with open_slide(a.path) as sa, open_slide(b.path) as sb:
        ta, tb = sa.thumbnail(mpp=8.0), sb.thumbnail(mpp=8.0)
    h, w = min(ta.shape[0], tb.shape[0]), min(ta.shape[1], tb.shape[1])
    assert abs(ta.shape[0] - tb.shape[0]) <= 1 and abs(ta.shape[1] - tb.shape[1]) <= 1
    assert np.abs(ta[:h, :w].astype(int) - tb[:h, :w].astype(int)).mean() < 6


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def test_write_synthetic_slide_rejects_bad_arguments(tmp_path, spec):
    for kwargs in (dict(mpp=0), dict(mpp=-0.2), dict(tile=100), dict(tile=8)):
        with pytest.raises(ConfigError):
            write_synthetic_slide(tmp_path / "x.tif", spec, **kwargs)
    with pytest.raises(ConfigError):
        write_pyramidal_tiff(tmp_path / "y.tif", lambda k, x, y, t: np.zeros((t, t, 3), np.uint8),
                             l0_size=(64, 64), mpp=0.5, flavour="ndpi")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind
