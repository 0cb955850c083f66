"""Tests for wsi_toolkit.annotations: ASAP XML, GeoJSON, tumour region, rasterising."""

from __future__ import annotations

import json
import logging
import math
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from wsi_toolkit.annotations import (
    EXCLUDE_GROUPS,
    TUMOR_GROUPS,
    Annotation,
    is_exclusion_group,
    is_tumor_group,
    rasterize,
    read_asap_xml,
    read_geojson,
    tumor_region,
    write_asap_xml,
    write_geojson,
)
from wsi_toolkit.errors import AnnotationError, ConfigError

LOGGER = "wsi_toolkit.annotations"


def _same_geometry(a, b) -> bool:
    """Same region: symmetric difference has (numerically) no area."""
    return a.symmetric_difference(b).area < 1e-9 * max(a.area, 1.0)


def _asap_annotation(l0_xy, *, ann_type="Polygon", group="_0", name="a") -> str:
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(l0_xy))
    return (
        f'<Annotation Name="{name}" Type="{ann_type}" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


def _asap_xml(annotations_xml: str) -> str:
    return (
        '<?xml version="1.0"?>\n<ASAP_Annotations>\n\t<Annotations>\n'
        + annotations_xml
        + "\n\t</Annotations>\n\t<AnnotationGroups />\n</ASAP_Annotations>\n"
    )


# --------------------------------------------------------------------------------------------
# Group names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tumor", "exclusion"),
    [
        ("_0", True, False),
        ("_1", True, False),
        ("Tumor", True, False),
        ("TUMOUR", True, False),
        ("Metastases", True, False),
        (" tumor ", True, False),
        ("_2", False, True),
        ("Exclusion", False, True),
        ("EXCLUSION", False, True),
        ("", False, False),
        ("Stroma", False, False),
        ("None", False, False),
        (None, False, False),
    ],
)
def test_group_classification(name, tumor, exclusion):
    assert is_tumor_group(name) is tumor
    assert is_exclusion_group(name) is exclusion


def test_group_tables_do_not_overlap():
    assert not {g.casefold() for g in TUMOR_GROUPS} & {g.casefold() for g in EXCLUDE_GROUPS}


def test_annotation_rejects_non_polygon():
    with pytest.raises(TypeError, match="Polygon"):
        Annotation(polygon=shapely.Point(1, 2), group="_0")


# --------------------------------------------------------------------------------------------
# ASAP XML
# --------------------------------------------------------------------------------------------


def test_asap_round_trip_keeps_polygons_groups_and_names(tmp_path):
    originals = [
        Annotation(shapely.Polygon([(10.5, 20.25), (400.75, 20.25), (380.0, 300.125), (15, 310)]), "_0", "A"),
        Annotation(shapely.Polygon([(1000, 1000), (1500, 1100), (1200, 1800)]), "_1", "B"),
        Annotation(box(1100, 1200, 1250, 1400), "_2", "C"),
        Annotation(shapely.Polygon([(1 / 3, 2 / 3), (12345.678901, 0.1), (9999.5, 8888.25)]), "Tumor", "D"),
    ]
    path = tmp_path / "slide.xml"
    write_asap_xml(path, originals)
    read = read_asap_xml(path)

    assert [(a.group, a.name) for a in read] == [(a.group, a.name) for a in originals]
    for got, want in zip(read, originals):
        assert got.polygon.equals_exact(want.polygon, tolerance=0.0)


def test_asap_write_lists_groups_and_writes_none_for_no_group(tmp_path):
    path = tmp_path / "slide.xml"
    write_asap_xml(
        path,
        [
            Annotation(box(0, 0, 10, 10), "_0"),
            Annotation(box(20, 0, 30, 10), ""),
            Annotation(box(40, 0, 50, 10), "_2"),
            Annotation(box(60, 0, 70, 10), "_0"),
        ],
        group_colors={"_0": "#123456"},
    )
    root = ET.parse(path).getroot()
    assert root.tag == "ASAP_Annotations"
    part_of = [a.get("PartOfGroup") for a in root.findall("./Annotations/Annotation")]
    assert part_of == ["_0", "None", "_2", "_0"]
    groups = {g.get("Name"): g.get("Color") for g in root.findall("./AnnotationGroups/Group")}
    assert list(groups) == ["_0", "_2"]
    assert groups["_0"] == "#123456"
    assert read_asap_xml(path)[1].group == ""


def test_asap_write_splits_multipolygon_into_parts(tmp_path):
    multi = shapely.MultiPolygon([box(0, 0, 10, 10), box(20, 20, 40, 30)])
    path = tmp_path / "multi.xml"
    write_asap_xml(path, [Annotation(multi, "_0", "lesion")])
    read = read_asap_xml(path)
    assert len(read) == 2
    assert all(a.group == "_0" for a in read)
    assert _same_geometry(shapely.union_all([a.polygon for a in read]), multi)


def test_asap_write_turns_tumor_hole_into_exclusion(tmp_path):
    outer, hole = box(0, 0, 100, 100), box(25, 25, 75, 75)
    path = tmp_path / "hole.xml"
    write_asap_xml(path, [Annotation(outer.difference(hole), "Tumor")])
    read = read_asap_xml(path)
    assert sorted(a.group for a in read) == ["Tumor", "_2"]
    assert tumor_region(read).area == pytest.approx(100 * 100 - 50 * 50)


def test_asap_write_drops_hole_of_other_group_with_warning(tmp_path, caplog):
    outer, hole = box(0, 0, 100, 100), box(25, 25, 75, 75)
    path = tmp_path / "hole.xml"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        write_asap_xml(path, [Annotation(outer.difference(hole), "Stroma")])
    read = read_asap_xml(path)
    assert len(read) == 1
    assert _same_geometry(read[0].polygon, outer)
    assert "hole" in caplog.text


def test_asap_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "slide.xml"
    path.write_text("old content")
    write_asap_xml(path, [Annotation(box(0, 0, 5, 5), "_0")])
    assert [p.name for p in tmp_path.iterdir()] == ["slide.xml"]
    assert len(read_asap_xml(path)) == 1


def test_asap_write_rejects_bad_colour(tmp_path):
    with pytest.raises(ConfigError, match="RRGGBB"):
        write_asap_xml(tmp_path / "x.xml", [Annotation(box(0, 0, 5, 5), "_0")], group_colors={"_0": "red"})


def test_asap_reads_camelyon_literal_with_comma_decimals_exponents_and_shuffled_order(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(
        _asap_xml(
            '\t\t<Annotation Name="_0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">\n'
            "\t\t\t<Coordinates>\n"
            '\t\t\t\t<Coordinate Order="2" X="1.2e+04" Y="2,5e3" />\n'
            '\t\t\t\t<Coordinate Order="0" X="10000,5" Y="2000" />\n'
            '\t\t\t\t<Coordinate Order="3" X="10000.5" Y="2500.25" />\n'
            '\t\t\t\t<Coordinate Order="1" X="12000" Y="2000" />\n'
            "\t\t\t</Coordinates>\n"
            "\t\t</Annotation>"
        )
    )
    (ann,) = read_asap_xml(path)
    assert ann.group == "_0"
    assert ann.name == "_0"
    assert list(ann.polygon.exterior.coords) == [
        (10000.5, 2000.0),
        (12000.0, 2000.0),
        (12000.0, 2500.0),
        (10000.5, 2500.25),
        (10000.5, 2000.0),
    ]


@pytest.mark.parametrize(
    ("ann_type", "expected_count"),
    [("Polygon", 1), ("Spline", 1), ("Rectangle", 1), ("Dot", 0), ("PointSet", 0)],
)
def test_asap_annotation_types(tmp_path, ann_type, expected_count):
    path = tmp_path / "types.xml"
    path.write_text(_asap_xml(_asap_annotation([(0, 0), (10, 0), (10, 10), (0, 10)], ann_type=ann_type)))
    read = read_asap_xml(path)
    assert len(read) == expected_count
    if expected_count:
        assert read[0].polygon.area == pytest.approx(100.0)


def test_asap_skips_polygon_with_two_points_with_warning(tmp_path, caplog):
    path = tmp_path / "short.xml"
    path.write_text(_asap_xml(_asap_annotation([(0, 0), (5, 5), (0, 0)], name="short")))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read_asap_xml(path) == []
    assert "short" in caplog.text


def test_asap_repairs_self_intersecting_polygon(tmp_path):
    # A bow tie (0,0)-(10,10)-(10,0)-(0,10): two triangles meeting at (5,5), each 10*5/2 = 25.
    path = tmp_path / "bowtie.xml"
    path.write_text(_asap_xml(_asap_annotation([(0, 0), (10, 10), (10, 0), (0, 10)], group="_1")))
    (ann,) = read_asap_xml(path)
    assert ann.polygon.is_valid
    assert ann.polygon.area == pytest.approx(50.0)
    assert ann.polygon.contains(shapely.Point(9, 5)) and ann.polygon.contains(shapely.Point(1, 5))
    assert not ann.polygon.contains(shapely.Point(5, 2))


# --------------------------------------------------------------------------------------------
# Tumour region
# --------------------------------------------------------------------------------------------


def test_tumor_region_subtracts_exclusions():
    anns = [
        Annotation(box(0, 0, 100, 100), "_0"),  # 10 000
        Annotation(box(50, 0, 150, 100), "_1"),  # overlaps the first by 50 x 100: union 15 000
        Annotation(box(300, 0, 340, 40), "Tumor"),  # 1 600
        Annotation(box(10, 10, 30, 30), "_2"),  # -400
        Annotation(box(120, 20, 200, 40), "_2"),  # overlaps tumour on x 120..150: -30*20 = -600
        Annotation(box(500, 500, 600, 600), "Stroma"),  # ignored
    ]
    region = tumor_region(anns)
    assert region.area == pytest.approx(15_000 + 1_600 - 400 - 600)
    assert not region.contains(shapely.Point(20, 20))
    assert region.contains(shapely.Point(60, 60))
    assert not region.intersects(shapely.Point(550, 550))


@pytest.mark.parametrize(
    "anns", [[], [Annotation(box(0, 0, 5, 5), "_2")], [Annotation(box(0, 0, 5, 5), "Stroma")]]
)
def test_tumor_region_empty_without_tumor(anns):
    region = tumor_region(anns)
    assert isinstance(region, shapely.Polygon)
    assert region.is_empty


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------


def _geojson_annotations() -> list[Annotation]:
    holed = shapely.Polygon(
        [(0, 0), (100, 0), (100, 100), (0, 100)], holes=[[(20, 20), (40, 20), (40, 40), (20, 40)]]
    )
    multi = shapely.MultiPolygon([box(200.5, 0, 300, 50), box(400, 400, 450.25, 475)])
    return [
        Annotation(holed, "Tumor", "holed", {"measurements": {"Area um^2": 9600.0, "Max prob": 0.97}}),
        Annotation(multi, "Stroma", "", {"isLocked": True}),
        Annotation(box(1, 2, 3, 4), "", "unclassified"),
    ]


def test_geojson_round_trip(tmp_path):
    originals = _geojson_annotations()
    path = tmp_path / "tumor.geojson"
    write_geojson(path, originals)
    read = read_geojson(path)

    assert [(a.group, a.name) for a in read] == [(a.group, a.name) for a in originals]
    for got, want in zip(read, originals):
        assert got.polygon.geom_type == want.polygon.geom_type
        assert got.polygon.equals_exact(want.polygon, tolerance=0.0)
    assert read[0].properties["measurements"] == {"Area um^2": 9600.0, "Max prob": 0.97}
    assert read[1].properties["isLocked"] is True


def test_geojson_output_is_qupath_feature_collection(tmp_path):
    path = tmp_path / "tumor.geojson"
    write_geojson(path, _geojson_annotations(), group_colors={"Stroma": "#0000FF"})
    doc = json.loads(path.read_text())

    assert doc["type"] == "FeatureCollection"
    features = doc["features"]
    assert [f["type"] for f in features] == ["Feature"] * 3
    assert len({uuid.UUID(f["id"]) for f in features}) == 3
    assert all(f["properties"]["objectType"] == "annotation" for f in features)
    class_names = [f["properties"].get("classification", {}).get("name") for f in features]
    assert class_names == ["Tumor", "Stroma", None]
    assert features[1]["properties"]["classification"]["color"] == [0, 0, 255]
    assert features[0]["properties"]["name"] == "holed"
    assert "name" not in features[1]["properties"]
    assert features[0]["geometry"]["type"] == "Polygon"
    assert len(features[0]["geometry"]["coordinates"]) == 2  # exterior + one hole
    assert features[1]["geometry"]["type"] == "MultiPolygon"
    assert [p.name for p in tmp_path.iterdir()] == ["tumor.geojson"]  # no temporary file left


_SQUARE = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
_FEATURE = {
    "type": "Feature",
    "geometry": _SQUARE,
    "properties": {"classification": {"name": "Tumor"}, "name": "sq"},
}


@pytest.mark.parametrize(
    ("doc", "group", "name"),
    [
        pytest.param({"type": "FeatureCollection", "features": [_FEATURE]}, "Tumor", "sq", id="collection"),
        pytest.param([_FEATURE], "Tumor", "sq", id="bare-list"),
        pytest.param(_FEATURE, "Tumor", "sq", id="single-feature"),
        pytest.param(_SQUARE, "", "", id="bare-geometry"),
        pytest.param(
            {"type": "Feature", "geometry": _SQUARE, "properties": {"classification": "Tumor"}},
            "Tumor",
            "",
            id="string-class",
        ),
    ],
)
def test_geojson_reads_accepted_layouts(tmp_path, doc, group, name):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(doc))
    (ann,) = read_geojson(path)
    assert (ann.group, ann.name) == (group, name)
    assert ann.polygon.equals(box(0, 0, 10, 10))


def test_geojson_skips_non_polygonal_geometry_with_warning(tmp_path, caplog):
    path = tmp_path / "mixed.geojson"
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}
    line_geom = {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}
    line = {"type": "Feature", "geometry": line_geom, "properties": {}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [point, _FEATURE, line]}))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        read = read_geojson(path)
    assert [a.name for a in read] == ["sq"]
    assert "Point" in caplog.text and "LineString" in caplog.text


# --------------------------------------------------------------------------------------------
# Rasterising
# --------------------------------------------------------------------------------------------
# With l0_mpp 0.25 and mask_mpp 2.0, one mask pixel is k = 8 level-0 px; the centre of mask
# pixel [r, c] is at level-0 ((c + 0.5) * 8, (r + 0.5) * 8).
# Square x in [101, 299], y in [51, 181]:
#   cols: 101 <= (c + 0.5) * 8 <= 299  <=>  12.625 <= c + 0.5 <= 37.375  <=>  c in 13..36
#   rows:  51 <= (r + 0.5) * 8 <= 181  <=>   6.375 <= r + 0.5 <= 22.625  <=>  r in 6..22
# Hole x in [165, 235], y in [83, 149]:
#   cols: 20.625 <= c + 0.5 <= 29.375 <=> c in 21..28;  rows: 10.375 <= r + 0.5 <= 18.625 <=> r in 10..18


def _expected(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[np.ix_(rows, cols)] = True
    return mask


_SQUARE_MASK = _expected((30, 50), range(6, 23), range(13, 37))
_HOLE_MASK = _expected((30, 50), range(10, 19), range(21, 29))


def test_rasterize_square_hits_hand_computed_pixels():
    mask = rasterize(box(101, 51, 299, 181), l0_size=(400, 240), l0_mpp=0.25, mask_mpp=2.0)
    assert mask.dtype == bool
    assert mask.shape == (30, 50)
    np.testing.assert_array_equal(mask, _SQUARE_MASK)


def test_rasterize_respects_holes():
    holed = box(101, 51, 299, 181).difference(box(165, 83, 235, 149))
    mask = rasterize(holed, l0_size=(400, 240), l0_mpp=0.25, mask_mpp=2.0)
    expected = _SQUARE_MASK & ~_HOLE_MASK
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("island_first", [False, True])
def test_rasterize_island_inside_hole_of_other_part(island_first):
    outer = box(101, 51, 299, 181).difference(box(165, 83, 235, 149))
    island = box(181, 99, 219, 133)  # cols 23..26 (22.625..27.375), rows 12..16 (12.375..16.625)
    parts = [island, outer] if island_first else [outer, island]
    mask = rasterize(shapely.MultiPolygon(parts), l0_size=(400, 240), l0_mpp=0.25, mask_mpp=2.0)
    expected = _SQUARE_MASK & ~_HOLE_MASK
    expected |= _expected((30, 50), range(12, 17), range(23, 27))
    np.testing.assert_array_equal(mask, expected)


def test_rasterize_circle_area_close_to_pi_r_squared():
    l0_radius = 2000.0
    circle = shapely.Point(4000, 4000).buffer(l0_radius, quad_segs=64)
    mask = rasterize(circle, l0_size=(8000, 8000), l0_mpp=0.25, mask_mpp=1.0)  # k = 4
    l0_area = mask.sum() * 4 * 4
    assert l0_area == pytest.approx(math.pi * l0_radius**2, rel=0.02)


@pytest.mark.parametrize("seed", range(5))
def test_rasterize_matches_pixel_centre_test(seed):
    # Independent truth: shapely's point-in-polygon at every mask pixel centre.
    rng = np.random.default_rng(seed)
    centres = rng.uniform(50, 950, (12, 2))
    blobs = [shapely.Point(*xy).buffer(rng.uniform(40, 200), quad_segs=7) for xy in centres[:6]]
    bites = [shapely.Point(*xy).buffer(rng.uniform(10, 60), quad_segs=5) for xy in centres[6:]]
    geom = shapely.union_all(blobs).difference(shapely.union_all(bites))
    l0_mpp, mask_mpp = 0.243, 0.243 * 6.3
    l0_size = (1000, 900)
    mask = rasterize(geom, l0_size=l0_size, l0_mpp=l0_mpp, mask_mpp=mask_mpp)

    k = mask_mpp / l0_mpp
    rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    expected = shapely.contains_xy(geom, (cols + 0.5) * k, (rows + 0.5) * k)
    assert mask.shape == (math.ceil(900 / k), math.ceil(1000 / k))
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    ("l0_size", "l0_mpp", "mask_mpp", "shape"),
    [
        ((1001, 500), 0.25, 2.0, (63, 126)),  # ceil(500/8), ceil(1001/8)
        ((400, 100), 0.243, 0.972, (25, 100)),
        ((300, 300), 0.1, 0.3, (100, 100)),  # 0.3/0.1 is 2.9999999999999996 in floats
        ((10, 10), 0.25, 0.25, (10, 10)),
    ],
)
def test_rasterize_mask_shape(l0_size, l0_mpp, mask_mpp, shape):
    assert rasterize(shapely.Polygon(), l0_size=l0_size, l0_mpp=l0_mpp, mask_mpp=mask_mpp).shape == shape


def test_rasterize_clips_geometry_larger_than_slide():
    mask = rasterize(box(-1e6, -1e6, 1e6, 1e6), l0_size=(80, 40), l0_mpp=0.5, mask_mpp=2.0)
    assert mask.shape == (10, 20)
    assert mask.all()


def test_rasterize_empty_geometry_is_all_false():
    assert not rasterize(shapely.Polygon(), l0_size=(80, 40), l0_mpp=0.5, mask_mpp=2.0).any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"l0_size": (0, 10), "l0_mpp": 0.25, "mask_mpp": 1.0},
        {"l0_size": (10, 10), "l0_mpp": 0.0, "mask_mpp": 1.0},
        {"l0_size": (10, 10), "l0_mpp": 0.25, "mask_mpp": float("nan")},
    ],
)
def test_rasterize_rejects_bad_settings(kwargs):
    with pytest.raises(ConfigError):
        rasterize(box(0, 0, 1, 1), **kwargs)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "content", "reader", "match"),
    [
        pytest.param("broken.xml", "<ASAP_Annotations><Annotations>", read_asap_xml, "XML", id="malformed-xml"),
        pytest.param("drawing.xml", "<svg><Annotation /></svg>", read_asap_xml, "ASAP_Annotations", id="not-asap"),
        pytest.param(
            "badnum.xml",
            _asap_xml(_asap_annotation([(0, 0), ("12a", 3), (5, 5)])),
            read_asap_xml,
            "12a",
            id="bad-number",
        ),
        pytest.param("missing.xml", None, read_asap_xml, "not found", id="missing-xml"),
        pytest.param("missing.geojson", None, read_geojson, "not found", id="missing-geojson"),
        pytest.param("broken.geojson", '{"type": "FeatureCollection", ', read_geojson, "JSON", id="malformed-json"),
        pytest.param(
            "config.json", '{"spec_version": "1.0", "num_classes": 2}', read_geojson, "not GeoJSON", id="json-object"
        ),
        pytest.param("numbers.json", "[1, 2, 3]", read_geojson, "neither", id="json-list"),
        pytest.param("scalar.json", "42", read_geojson, "not GeoJSON", id="json-scalar"),
        pytest.param(
            "badgeom.geojson",
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": "oops"}, "properties": {}}',
            read_geojson,
            "geometry",
            id="bad-geometry",
        ),
    ],
)
def test_reader_errors_name_the_file(tmp_path, filename, content, reader, match):
    path = tmp_path / filename
    if content is not None:
        path.write_text(content)
    with pytest.raises(AnnotationError, match=match) as info:
        reader(path)
    assert filename in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# Issue 11: damaged numbers and outlines that do not belong to the slide
# --------------------------------------------------------------------------------------------


def _feature(coords) -> str:
    return ('{"type": "Feature", "properties": {"classification": {"name": "Tumor"}}, '
            '"geometry": {"type": "Polygon", "coordinates": [' + coords + ']}}')


@pytest.mark.parametrize("text,match", [
    pytest.param(_feature("[[0, 0], [Infinity, 0], [5, 5], [0, 0]]"), "Infinity", id="Infinity"),
    pytest.param(_feature("[[0, 0], [NaN, 0], [5, 5], [0, 0]]"), "NaN", id="NaN"),
    pytest.param(_feature("[[0, 0], [1e400, 0], [5, 5], [0, 0]]"), "level-0 pixel", id="1e400"),
    pytest.param(_feature("[[0, 0], [1e308, 0], [1e308, 1e308], [0, 0]]"), "level-0 pixel", id="1e308"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nested too deeply", id="100k-nested"),
    pytest.param('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]}}',
                 "malformed geometry", id="two-points"),
])
def test_geojson_damage_is_an_annotation_error(tmp_path, text, match):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=match) as info:
        read_geojson(path)
    assert "bad.geojson" in str(info.value) and "\n" not in str(info.value)


def test_geojson_not_utf8_is_an_annotation_error(tmp_path):
    path = tmp_path / "latin1.geojson"
    path.write_bytes(_feature("[[0, 0], [5, 0], [5, 5], [0, 0]]").replace("Tumor", "Tum\xe9ur").encode("latin-1"))
    with pytest.raises(AnnotationError, match="UTF-8"):
        read_geojson(path)


def test_asap_coordinate_beyond_any_slide_is_refused(tmp_path):
    path = tmp_path / "huge.xml"
    path.write_text(_asap_xml(_asap_annotation([(0, 0), ("1e308", 0), ("1e308", "1e308")])))
    with pytest.raises(AnnotationError, match="not a level-0 pixel") as info:
        read_asap_xml(path)
    assert "huge.xml" in str(info.value)


def test_rasterize_refuses_coordinates_beyond_any_slide_without_overflow(recwarn):
    with pytest.raises(AnnotationError, match="level-0 pixel"):
        rasterize(box(0, 0, 1e308, 1e308), l0_size=(1000, 1000), l0_mpp=0.25, mask_mpp=8.0)
    assert not [w for w in recwarn if "overflow" in str(w.message)]


def test_outline_off_the_slide_or_around_it_is_refused(tmp_path, caplog):
    from wsi_toolkit.annotations import check_on_slide

    size = (10_000, 8_000)
    inside = Annotation(box(100, 100, 900, 900), group="_0")
    check_on_slide([inside], size)  # fine, silent
    with pytest.raises(AnnotationError, match="entirely outside"):
        check_on_slide([inside, Annotation(box(20_000, 0, 30_000, 500), group="_0")], size, where="a.xml")
    with pytest.raises(AnnotationError, match="surrounds the whole") as info:
        check_on_slide([Annotation(box(-10, -10, 10_010, 8_010), group="Tumor")], size, where="a.xml")
    assert "a.xml" in str(info.value) and "Tumor" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="wsi_toolkit.annotations"):
        check_on_slide([Annotation(box(9_000, 100, 12_000, 900), group="_0")], size)
    assert "beyond" in caplog.text
    # The readers do the same when given the slide size.
    path = tmp_path / "off.xml"
    write_asap_xml(path, [Annotation(box(20_000, 0, 30_000, 500), group="_0")])
    assert len(read_asap_xml(path)) == 1
    with pytest.raises(AnnotationError, match="entirely outside"):
        read_asap_xml(path, l0_size=size)
    gj = tmp_path / "around.geojson"
    write_geojson(gj, [Annotation(box(-5, -5, 20_000, 20_000), group="Tumor")])
    with pytest.raises(AnnotationError, match="surrounds"):
        read_geojson(gj, l0_size=size)


def test_geojson_writes_given_feature_ids(tmp_path):
    anns = [Annotation(box(0, 0, 5, 5), "_0"), Annotation(box(10, 10, 15, 15), "_0")]
    write_geojson(tmp_path / "a.geojson", anns, feature_ids=["id-1", "id-2"])
    doc = json.loads((tmp_path / "a.geojson").read_text())
    assert [f["id"] for f in doc["features"]] == ["id-1", "id-2"]
    with pytest.raises(ConfigError, match="feature_ids"):
        write_geojson(tmp_path / "b.geojson", anns, feature_ids=["only-one"])
    assert not (tmp_path / "b.geojson").exists()
