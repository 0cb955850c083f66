"""Review mode: the review.geojson format (read, validate, save with history and conflict check,
import), the review queue, and the server's guarded write path (token, origin, size, traversal,
concurrent saves). The page itself: test_view_browser.py."""

from __future__ import annotations

import json
import re
import threading
import uuid
from pathlib import Path

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



# ------------------------------------------------------------------------------------------------
# The review queue
# ------------------------------------------------------------------------------------------------


def heat(prob, predicted=None, *, cell_l0: float = 64.0, l0_mpp: float = 0.5):
    from wsi_toolkit.heatmap import Heatmap

    prob = np.asarray(prob, dtype=np.float32)
    return Heatmap(prob=prob, predicted=np.ones(prob.shape, bool) if predicted is None else predicted,
                   cell_l0=cell_l0, l0_mpp=l0_mpp, merge="centre")


def test_queue_ranks_uncertain_areas_by_their_summed_std():
    from wsi_toolkit.view.queue import review_queue

    p = np.full((6, 8), 0.9)
    std = np.zeros((6, 8))
    std[0:2, 0:2] = 0.15  # a 2x2 area: 4 x 0.15 = 0.6, reviewed first
    std[5, 3] = 0.3  # one cell: 0.3, reviewed last
    std[2, 6], std[3, 7] = 0.12, 0.2  # two cells touching at a corner: one area, 0.32, second
    std[4, 0] = 0.05  # below 0.1: not queued
    items = review_queue(heat(p), threshold=0.5, uncertainty=heat(std))
    assert [it.rule for it in items] == ["uncertainty"] * 3
    assert [it.bbox_l0 for it in items] == [(0, 0, 128, 128), (384, 128, 512, 256), (192, 320, 256, 384)]
    assert [it.n_cells for it in items] == [4, 2, 1]
    assert [it.score for it in items] == pytest.approx([0.6, 0.32, 0.3])
    assert items[0].area_mm2 == pytest.approx(4 * (64 * 0.5) ** 2 / 1e6)
    assert items[0].mean_prob == pytest.approx(0.9) and items[0].mean_std == pytest.approx(0.15)
    assert "mean uncertainty 0.15" in items[0].reason


def test_queue_without_uncertainty_ranks_by_closeness_to_the_threshold():
    from wsi_toolkit.view.queue import review_queue

    p = np.array([[0.52, 0.0, 0.0, 0.45],
                  [0.0, 0.0, 0.0, 0.0],
                  [0.9, 0.58, 0.0, 0.1]])
    predicted = np.ones(p.shape, bool)
    predicted[1, 1] = False
    items = review_queue(heat(p, predicted), threshold=0.5)
    # |p - 0.5|: 0.02 (cell [0,0]), 0.05 ([0,3]), 0.08 ([2,1]); the rest are > 0.1 away; single cells
    assert [it.bbox_l0[:2] for it in items] == [(0, 0), (192, 0), (64, 128)]
    assert [it.score for it in items] == pytest.approx([0.8, 0.5, 0.2])
    assert "mean p 0.52" in items[0].reason
    assert all(it.rule == "threshold" and it.mean_std is None for it in items)


def test_queue_skips_cells_without_a_prediction_and_can_be_empty():
    from wsi_toolkit.view.queue import review_queue

    p = np.full((3, 3), 0.5)
    assert review_queue(heat(p, np.zeros((3, 3), bool)), threshold=0.5) == []
    assert review_queue(heat(np.full((3, 3), 0.99)), threshold=0.5) == []


# ------------------------------------------------------------------------------------------------
# The server's write path
# ------------------------------------------------------------------------------------------------

TOKEN = "t" * 8 + "-per-start-token-of-the-test"


@pytest.fixture(scope="module")
def review_results(model_dir, tmp_path_factory):
    """A SYNTHETIC slide's wsi-infer results folder (small, few tiles)."""
    from wsi_toolkit.inference import InferenceConfig
    from wsi_toolkit.pipeline import RunConfig, run_batch
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    root = tmp_path_factory.mktemp("review")
    slide = write_synthetic_slide(root / "small.tif", make_spec(tissue_mm2=0.1, n_tumors=1, faint=False, pen=False,
                                                                seed=4), mpp=0.5, tile=256)
    run_batch([slide.path], model_dir, root / "out", RunConfig(inference=InferenceConfig(progress=False)))
    return root / "out"


@pytest.fixture
def out(review_results, tmp_path) -> Path:
    """A private copy of the results (each test saves its own reviews), inside a folder that must stay
    untouched apart from it."""
    import shutil

    pytest.importorskip("fastapi", reason="the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]'")
    dst = tmp_path / "site" / "out"
    shutil.copytree(review_results, dst)
    return dst


def client_for(out: Path, *, review: bool = True, max_body_bytes: int = 16 * 2**20):
    from fastapi.testclient import TestClient

    from wsi_toolkit.view import Catalogue, ReviewSettings, create_app

    settings = ReviewSettings(token=TOKEN, author="dr test", max_body_bytes=max_body_bytes) if review else None
    app = create_app(Catalogue.from_results(out), workers=1, review=settings)
    return TestClient(app, base_url="http://127.0.0.1:8123")


def body(*features, base_version: int = 0) -> dict:
    return {**collection(*features), "base_version": base_version}


def put(client, doc, *, slide: str = "small", token: str | None = TOKEN, **headers):
    hdrs = {"Content-Type": "application/json", **headers}
    if token is not None:
        hdrs["X-WSI-Token"] = token
    return client.put(f"/data/{slide}/review", content=json.dumps(doc).encode(), headers=hdrs)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_a_write_with_the_token_saves_and_reads_back(out):
    client = client_for(out)
    r = put(client, body(feature(square(10, 10), "Tumor")))
    assert r.status_code == 200 and r.json() == {"version": 1}, r.text
    got = client.get("/data/small/review.json").json()
    assert got["wsi_toolkit"]["version"] == 1 and got["features"][0]["properties"]["author"] == "dr test"
    assert read_review(out / "small" / "review.geojson").features[0].classification == "Tumor"


def test_the_review_of_a_slide_without_one_is_version_zero(out):
    got = client_for(out).get("/data/small/review.json").json()
    assert got["features"] == [] and got["wsi_toolkit"]["version"] == 0


@pytest.mark.parametrize("token", [None, "", "wrong-token-wrong-token", TOKEN[:-1], TOKEN + "x"])
def test_a_write_without_the_right_token_is_refused(out, token):
    before = files_under(out.parent)
    r = put(client_for(out), body(feature(square(10, 10))), token=token)
    assert r.status_code == 403 and "token" in r.json()["detail"]
    assert files_under(out.parent) == before


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Origin": "null"},
                                     {"Origin": "http://127.0.0.1:9999"}, {"Sec-Fetch-Site": "cross-site"}])
def test_a_cross_origin_write_is_refused_even_with_the_token(out, headers):
    r = put(client_for(out), body(feature(square(10, 10))), **headers)
    assert r.status_code == 403
    assert not (out / "small" / "review.geojson").exists()


def test_a_same_origin_write_is_accepted(out):
    r = put(client_for(out), body(feature(square(10, 10))), Origin="http://127.0.0.1:8123",
            **{"Sec-Fetch-Site": "same-origin"})
    assert r.status_code == 200


def test_an_oversized_body_is_refused(out):
    client = client_for(out, max_body_bytes=4096)
    big = body(feature(square(10, 10), note="n" * 5000))
    assert put(client, big).status_code == 413  # by its Content-Length

    def chunks():  # no Content-Length: refused by the bytes read
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    r = client.put("/data/small/review", content=chunks(),
                   headers={"Content-Type": "application/json", "X-WSI-Token": TOKEN})
    assert r.status_code == 413
    assert not (out / "small" / "review.geojson").exists()


@pytest.mark.parametrize("doc, match", [
    (b"{not json", "not JSON"),
    (b'{"type": "FeatureCollection", "features": [], "base_version": NaN}', "not JSON"),
    (json.dumps(collection(feature(square(10, 10)))).encode(), "base_version"),
    (json.dumps(body(feature(square(10, 10), "Stroma"))).encode(), "not one of"),
    (json.dumps(body(feature(square(10, 10, 50_000)))).encode(), "outside"),
    (json.dumps(body(feature([[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]]))).encode(), "valid polygon"),
])
def test_an_invalid_review_is_refused_with_a_message(out, doc, match):
    r = client_for(out).put("/data/small/review", content=doc,
                            headers={"Content-Type": "application/json", "X-WSI-Token": TOKEN})
    assert r.status_code == 422 and re.search(match, r.json()["detail"])
    assert not (out / "small" / "review.geojson").exists()


def test_a_body_that_is_not_json_typed_is_refused(out):
    r = put(client_for(out), body(feature(square(10, 10))), **{"Content-Type": "text/plain"})
    assert r.status_code == 415


@pytest.mark.parametrize("slide", ["..", "%2e%2e", "a/../../x", "..%2f..%2fout", "%2e%2e%2f%2e%2e", "nope",
                                   "small%2f..%2f..", "/etc/passwd"])
def test_traversal_ids_reach_nothing_and_write_nothing(out, slide):
    before = files_under(out.parent)
    r = put(client_for(out), body(feature(square(10, 10))), slide=slide)
    assert r.status_code in (404, 405)
    assert files_under(out.parent) == before


def test_two_tabs_saving_at_once_lose_nothing(out):
    """Both tabs loaded version 0; the second to save is refused (409, with the current version) and
    saves again after merging the first tab's features: both outlines are in the file."""
    client = client_for(out)
    a, b = feature(square(10, 10), "Tumor"), feature(square(300, 300), "Normal")
    assert put(client, body(a, base_version=0)).status_code == 200
    late = put(client, body(b, base_version=0))
    assert late.status_code == 409 and late.json()["current_version"] == 1
    current = client.get("/data/small/review.json").json()
    merged = body(*current["features"], b, base_version=current["wsi_toolkit"]["version"])
    assert put(client, merged).json() == {"version": 2}
    assert {f.id for f in read_review(out / "small" / "review.geojson").features} == {a["id"], b["id"]}


def test_a_read_only_server_has_no_write_route(out):
    client = client_for(out, review=False)
    r = put(client, body(feature(square(10, 10))))
    assert r.status_code in (404, 405)
    assert client.get("/data/slides.json").json()["review_mode"] is False
    assert not (out / "small" / "review.geojson").exists()


def test_a_review_server_says_so_and_serves_the_queue(out):
    client = client_for(out)
    assert client.get("/data/slides.json").json()["review_mode"] is True
    queue = client.get("/data/small/queue.json").json()
    assert queue["error"] is None and isinstance(queue["items"], list)
    for item in queue["items"]:
        x0, y0, x1, y1 = item["bbox_l0"]
        assert 0 <= x0 < x1 and 0 <= y0 < y1 and item["reason"]


def test_the_static_export_has_no_token_and_is_read_only(out, tmp_path):
    from wsi_toolkit.view import Catalogue, export_site

    client = client_for(out)
    put(client, body(feature(square(10, 10))))
    site = tmp_path / "export"
    export_site(Catalogue.from_results(out), site, workers=1)
    assert json.loads((site / "data" / "slides.json").read_text())["review_mode"] is False
    assert json.loads((site / "data" / "small" / "review.json").read_text())["wsi_toolkit"]["version"] == 1
    for path in site.rglob("*"):
        if path.is_file() and path.suffix in (".js", ".json", ".html"):
            assert TOKEN not in path.read_text(encoding="utf-8", errors="replace")


def test_cli_imports_a_review_file(out, tmp_path, capsys):
    from wsi_toolkit.cli.view import main

    src = tmp_path / "qupath.geojson"
    src.write_text(json.dumps(collection(feature(square(10, 10), "tumour"))))
    assert main([str(out), "--import-review", "small", str(src), "--author", "dr cli"]) == 0
    review = read_review(out / "small" / "review.geojson")
    assert review.version == 1 and review.features[0].author == "dr cli"
    assert main([str(out), "--import-review", "nope", str(src)]) == 1
    assert "no slide 'nope'" in capsys.readouterr().err
    src.write_text(json.dumps(collection(feature(square(10, 10), "Stroma"))))
    assert main([str(out), "--import-review", "small", str(src)]) == 2
    assert "Stroma" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/data/../review", "/data/%2e%2e/review", "/data/a/../../x/review",
                                  "/data/small/../../review", "/data/%2e%2e%2f%2e%2e%2fsmall/review"])
def test_raw_traversal_paths_on_a_live_server_write_nothing(out, path):
    """The path exactly as sent (no client-side normalisation of ``..`` or escapes)."""
    import http.client

    from wsi_toolkit.view import Catalogue, ReviewSettings, ViewerServer, create_app

    before = files_under(out.parent)
    srv = ViewerServer(create_app(Catalogue.from_results(out), workers=1,
                                  review=ReviewSettings(token=TOKEN, author="x"))).start()
    try:
        data = json.dumps(body(feature(square(10, 10)))).encode()
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
        conn.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
        for k, v in (("Host", "127.0.0.1"), ("Content-Type", "application/json"), ("X-WSI-Token", TOKEN),
                     ("Content-Length", str(len(data)))):
            conn.putheader(k, v)
        conn.endheaders(data)
        status = conn.getresponse().status
        conn.close()
    finally:
        srv.stop()
    assert status in (404, 405)
    assert files_under(out.parent) == before


@pytest.mark.parametrize("name", ["review.geojson", "review_history"])
def test_a_linked_review_file_or_history_is_refused(tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results = tmp_path / "results"
    results.mkdir()
    target = elsewhere / "x.geojson" if name.endswith(".geojson") else elsewhere
    if name.endswith(".geojson"):
        target.write_text("{}")
    (results / name).symlink_to(target)
    feats = validate_review(collection(feature(square(10, 10))), l0_size=SLIDE_L0)
    with pytest.raises(AnnotationError, match="symbolic link"):
        save_review(results, feats, base_version=0, author="x")
    assert sorted(p.name for p in elsewhere.iterdir()) == (["x.geojson"] if name.endswith(".geojson") else [])


def test_cli_review_mode_prints_the_url_with_its_token(out):
    import os
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "wsi_toolkit.cli.view", str(out), "--review", "--author", "dr sub"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = proc.stdout.readline().strip()
        base, _, fragment = url.partition("#token=")
        assert base.startswith("http://127.0.0.1:") and len(fragment) >= 32
        data = json.dumps(body(feature(square(10, 10)))).encode()

        def put_with(token: str | None) -> int:
            headers = {"Content-Type": "application/json", **({"X-WSI-Token": token} if token else {})}
            req = urllib.request.Request(base + "data/small/review", data=data, headers=headers, method="PUT")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert put_with(None) == 403
        assert put_with(fragment) == 200
        assert read_review(out / "small" / "review.geojson").features[0].author == "dr sub"
    finally:
        proc.terminate()
        proc.wait(10)
