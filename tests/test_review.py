"""Review mode: the review.geojson format (read, validate, save with history and conflict check,
import), the review queue, and the server's guarded write path (token, origin, size, traversal,
concurrent saves). The page itself: test_view_browser.py."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest

from wsi_toolkit.annotations import read_geojson
from wsi_toolkit.annotations.review import (
    MAX_FEATURE_VERTICES,
    MAX_TEXT_CHARS,
    ReviewFeature,
    import_review,
    load_review,
    read_review,
    save_review,
    validate_review,
)
from wsi_toolkit.errors import AnnotationError, ReviewConflictError

SLIDE_L0 = (4000, 3000)


def square(x: float, y: float, side: float = 100.0) -> list[list[list[float]]]:
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def feature(coords, cls: str = "Tumor", **props) -> dict:
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": cls}, **props}}


def collection(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


# ------------------------------------------------------------------------------------------------
# The file format
# ------------------------------------------------------------------------------------------------


def test_saved_review_reads_back_and_as_qupath_geojson(tmp_path):
    doc = collection(feature(square(10, 20), "Tumor", note="dense"), feature(square(500, 600, 50), "Normal"),
                     feature(square(1000, 1000, 30), "Exclude"))
    feats = validate_review(doc, l0_size=SLIDE_L0)
    assert save_review(tmp_path, feats, base_version=0, author="dr a", slide="s.tif") == 1
    back = read_review(tmp_path / "review.geojson")
    assert back.version == 1 and back.slide == "s.tif" and back.saved
    assert [f.classification for f in back.features] == ["Tumor", "Normal", "Exclude"]
    assert [f.id for f in back.features] == [f["id"] for f in doc["features"]]
    assert all(f.author == "dr a" and f.time.endswith("Z") for f in back.features)
    assert back.features[0].note == "dense" and back.features[0].polygon.area == 100 * 100
    anns = read_geojson(tmp_path / "review.geojson", l0_size=SLIDE_L0)  # the toolkit's QuPath reader
    assert [a.group for a in anns] == ["Tumor", "Normal", "Exclude"]
    assert anns[1].polygon.bounds == (500, 600, 550, 650)
    raw = json.loads((tmp_path / "review.geojson").read_text())
    assert raw["wsi_toolkit"]["kind"] == "review" and raw["features"][0]["properties"]["objectType"] == "annotation"
    assert raw["features"][0]["properties"]["classification"]["color"] == [200, 0, 0]


def test_no_review_yet_is_version_zero(tmp_path):
    review = load_review(tmp_path)
    assert review.version == 0 and review.features == ()


@pytest.mark.parametrize("bad, match", [
    (collection(feature(square(10, 10), "Stroma")), "not one of"),
    (collection(feature(square(10, 10), "tumor")), "not one of"),  # a submission spells the class exactly
    (collection(feature(square(3950, 10))), "outside"),
    (collection(feature(square(-5, 10))), "outside"),
    (collection(feature([[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]])), "not a valid polygon"),
    (collection(feature([[[0, 0], [100, 100], [200, 200], [0, 0]]])), "not a valid polygon|no area"),
    (collection(feature([[[0, 0], [100, 0], [0, 0]]])), "at least 4"),
    (collection(feature([[[0, 0], [100, 0], [100, 100], [0, 100]]])), "closed"),
    (collection(feature([[[0, 0], [100, 0], ["x", 1], [0, 0]]])), "numbers"),
    (collection({**feature(square(10, 10)), "geometry": {"type": "Point", "coordinates": [1, 2]}}), "Point"),
    (collection(feature(square(10, 10), note="n" * (MAX_TEXT_CHARS + 1))), "characters"),
    (collection({**feature(square(10, 10)), "id": "../../etc"}), "not a UUID"),
    ({"type": "Feature"}, "FeatureCollection"),
])
def test_validation_refuses(bad, match):
    with pytest.raises(AnnotationError, match=match):
        validate_review(bad, l0_size=SLIDE_L0)


def test_validation_refuses_too_many_vertices():
    n = MAX_FEATURE_VERTICES + 10
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.c_[2000 + 900 * np.cos(t), 1500 + 900 * np.sin(t)].tolist()
    with pytest.raises(AnnotationError, match="vertices"):
        validate_review(collection(feature([ring + [ring[0]]])), l0_size=SLIDE_L0)


def test_validation_refuses_a_repeated_id():
    f = feature(square(10, 10))
    with pytest.raises(AnnotationError, match="twice"):
        validate_review(collection(f, {**f}), l0_size=SLIDE_L0)


def test_submitted_author_and_time_are_not_trusted(tmp_path):
    feats = validate_review(collection(feature(square(10, 10), author="someone else", time="1999-01-01T00:00:00Z")),
                            l0_size=SLIDE_L0)
    save_review(tmp_path, feats, base_version=0, author="me")
    f = read_review(tmp_path / "review.geojson").features[0]
    assert f.author == "me" and f.time != "1999-01-01T00:00:00Z"


# ------------------------------------------------------------------------------------------------
# Versions, history, conflicts
# ------------------------------------------------------------------------------------------------


def test_each_save_is_a_version_and_the_previous_file_is_kept(tmp_path):
    a = validate_review(collection(feature(square(10, 10))), l0_size=SLIDE_L0)
    assert save_review(tmp_path, a, base_version=0, author="x") == 1
    first = (tmp_path / "review.geojson").read_text()
    b = validate_review(collection(feature(square(300, 300), "Normal")), l0_size=SLIDE_L0)
    assert save_review(tmp_path, a + b, base_version=1, author="y") == 2
    assert (tmp_path / "review_history" / "review.v1.geojson").read_text() == first
    assert save_review(tmp_path, b, base_version=2, author="y") == 3
    assert read_review(tmp_path / "review_history" / "review.v2.geojson").version == 2
    now = read_review(tmp_path / "review.geojson")
    assert now.version == 3 and [f.id for f in now.features] == [b[0].id]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_unchanged_features_keep_their_author_and_changed_ones_get_the_saver(tmp_path):
    a, b = validate_review(collection(feature(square(10, 10)), feature(square(300, 300))), l0_size=SLIDE_L0)
    save_review(tmp_path, [a, b], base_version=0, author="first")
    relabelled = ReviewFeature(id=b.id, polygon=b.polygon, classification="Normal")
    save_review(tmp_path, [a, relabelled], base_version=1, author="second")
    got = {f.id: f for f in read_review(tmp_path / "review.geojson").features}
    assert got[a.id].author == "first" and got[b.id].author == "second" and got[b.id].classification == "Normal"


def test_a_save_on_a_stale_version_is_refused_and_writes_nothing(tmp_path):
    a = validate_review(collection(feature(square(10, 10))), l0_size=SLIDE_L0)
    save_review(tmp_path, a, base_version=0, author="tab 1")
    save_review(tmp_path, a, base_version=1, author="tab 1")
    before = (tmp_path / "review.geojson").read_bytes()
    with pytest.raises(ReviewConflictError, match="version 2 was saved") as info:
        save_review(tmp_path, (), base_version=1, author="tab 2")
    assert info.value.current_version == 2 and info.value.base_version == 1
    assert (tmp_path / "review.geojson").read_bytes() == before


def test_concurrent_saves_lose_nothing(tmp_path):
    """N writers, each: load, add its own feature, save on the loaded version, and on a conflict load
    again and retry (what the page does). Every feature is there at the end, one version per save."""
    n = 8
    conflicts = []

    def writer(i: int) -> None:
        mine = validate_review(collection(feature(square(100 * i, 100, 50))), l0_size=SLIDE_L0)[0]
        for _ in range(200):
            current = load_review(tmp_path)
            try:
                save_review(tmp_path, [*current.features, mine], base_version=current.version, author=f"tab {i}")
                return
            except ReviewConflictError:
                conflicts.append(i)
        raise AssertionError("never saved")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    final = load_review(tmp_path)
    assert final.version == n
    assert sorted(f.author for f in final.features) == sorted(f"tab {i}" for i in range(n))
    assert len(list((tmp_path / "review_history").iterdir())) == n - 1


# ------------------------------------------------------------------------------------------------
# Import from QuPath and ASAP
# ------------------------------------------------------------------------------------------------


def test_import_a_qupath_geojson(tmp_path):
    qupath = [  # QuPath's "Export objects as GeoJSON": a bare list of features, other class spellings
        {"type": "Feature", "id": "x", "geometry": {"type": "Polygon", "coordinates": square(10, 10)},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumour", "colorRGB": -3670016}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(3950, 100)},  # half off the slide
         "properties": {"objectType": "annotation", "name": "fold here", "classification": {"name": "artefact"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square(200, 200)},
         "properties": {"classification": {"name": "NORMAL"}, "author": "dr q", "time": "2026-01-02T03:04:05Z"}},
    ]
    src = tmp_path / "export.geojson"
    src.write_text(json.dumps(qupath))
    out = tmp_path / "out"
    out.mkdir()
    assert import_review(out, src, l0_size=SLIDE_L0, author="importer") == 1
    got = read_review(out / "review.geojson").features
    assert [f.classification for f in got] == ["Tumor", "Exclude", "Normal"]
    assert got[1].polygon.bounds == (3950, 100, 4000, 200) and got[1].note == "fold here"  # clipped to the slide
    assert (got[0].author, got[2].author, got[2].time) == ("importer", "dr q", "2026-01-02T03:04:05Z")
    assert import_review(out, src, l0_size=SLIDE_L0, author="importer") == 2  # a new version, history kept
    assert (out / "review_history" / "review.v1.geojson").is_file()


def test_import_an_asap_xml(tmp_path):
    xml = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
 <Annotation Name="A1" Type="Polygon" PartOfGroup="_0" Color="#F4FA58"><Coordinates>
  <Coordinate Order="0" X="100" Y="100"/><Coordinate Order="1" X="400" Y="100"/>
  <Coordinate Order="2" X="400" Y="300"/><Coordinate Order="3" X="100" Y="300"/></Coordinates></Annotation>
 <Annotation Name="A2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E"><Coordinates>
  <Coordinate Order="0" X="150" Y="150"/><Coordinate Order="1" X="200" Y="150"/>
  <Coordinate Order="2" X="200" Y="200"/></Coordinates></Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>"""
    src = tmp_path / "slide.xml"
    src.write_text(xml)
    assert import_review(tmp_path, src, l0_size=SLIDE_L0, author="me") == 1
    got = read_review(tmp_path / "review.geojson").features
    assert [f.classification for f in got] == ["Tumor", "Normal"]  # Camelyon16 _2: non-tumour inside a lesion
    assert got[0].polygon.area == 300 * 200


def test_import_refuses_unknown_classes_naming_them(tmp_path):
    src = tmp_path / "e.geojson"
    src.write_text(json.dumps(collection(feature(square(10, 10), "Stroma"), feature(square(300, 300), "Tumor"),
                                         {**feature(square(500, 500)), "properties": {}})))
    with pytest.raises(AnnotationError, match=r"'\(no class\)', 'Stroma'"):
        import_review(tmp_path, src, l0_size=SLIDE_L0, author="me")
    assert not (tmp_path / "review.geojson").exists()


def test_import_refuses_another_slides_file(tmp_path):
    src = tmp_path / "e.geojson"
    src.write_text(json.dumps(collection(feature(square(90_000, 90_000), "Tumor"))))
    with pytest.raises(AnnotationError, match="outside"):
        import_review(tmp_path, src, l0_size=SLIDE_L0, author="me")

