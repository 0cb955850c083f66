"""wsi-view without a browser: the Deep Zoom contract, the tile cache, the server's URLs and safety,
damaged slides, the static export and the command line (the page itself: test_view_browser.py)."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_toolkit.export import INFERNO_LUT, read_heatmap_tiff
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.pipeline import RunConfig, run_batch
from wsi_toolkit.slide import open_slide
from wsi_toolkit.view import (
    Catalogue,
    DeepZoomGeometry,
    OpenSlideTiles,
    ReaderTiles,
    TileCache,
    ViewerServer,
    create_app,
    export_site,
)
from wsi_toolkit.view.catalogue import ViewerError
from wsi_toolkit.view.site import SITE_MARKER
from wsi_toolkit.view.tiles import TileAddressError

openslide = pytest.importorskip("openslide")
pytest.importorskip("fastapi", reason="the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]'")
pytest.importorskip("uvicorn", reason="the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]'")


# ------------------------------------------------------------------------------------------------
# A results folder of three SYNTHETIC slides, one per layout the toolkit reads
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(synthetic_slides, model_dir, tmp_path_factory):
    """OUT with: a generic TIFF (tifffile), an SVS read with OpenSlide, an SVS without mpp (--mpp 0.226)."""
    root = tmp_path_factory.mktemp("view")
    slides = {"tiff": synthetic_slides(0.243, "tiff").path, "svs": synthetic_slides(0.25, "svs").path,
              "nompp": synthetic_slides(0.226, "svs-nompp").path}
    out = root / "out"
    inf = InferenceConfig(progress=False)
    run_batch([slides["tiff"]], model_dir, out, RunConfig(inference=inf))
    run_batch([slides["svs"]], model_dir, out, RunConfig(inference=inf, backend="openslide"))
    run_batch([slides["nompp"]], model_dir, out, RunConfig(inference=inf, mpp_override=0.226))
    ids = {k: Path(p).stem for k, p in slides.items()}
    return {"out": out, "slides": slides, "ids": ids, "root": root}


@pytest.fixture(scope="module")
def server(results):
    catalogue = Catalogue.from_results(results["out"])
    srv = ViewerServer(create_app(catalogue, cache_bytes=8 * 2**20, workers=2)).start()
    yield srv
    srv.stop()
    catalogue.close()


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw_get(srv: ViewerServer, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A GET with the path exactly as given (no client-side normalisation of ``..`` or escapes)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def jpeg_size(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    assert img.format == "JPEG"
    return img.size


# ------------------------------------------------------------------------------------------------
# The Deep Zoom contract
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (254, 254), (255, 100), (1001, 517), (4097, 3)])
def test_geometry_is_deepzoomgenerators(size):
    from openslide.deepzoom import DeepZoomGenerator

    dz = DeepZoomGenerator(openslide.ImageSlide(Image.new("RGB", size)), tile_size=254, overlap=1)
    geo = DeepZoomGeometry(*size)
    assert geo.level_dimensions == tuple(dz.level_dimensions)
    assert geo.level_tiles == tuple(dz.level_tiles) and geo.tile_count == dz.tile_count
    for z in range(geo.level_count):
        cols, rows = geo.level_tiles[z]
        for c, r in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2), (cols - 1, 0)}:
            assert geo.tile_box(z, c, r)[2:] == dz.get_tile_dimensions(z, (c, r))
    with pytest.raises(TileAddressError):
        geo.tile_box(geo.level_count, 0, 0)
    with pytest.raises(TileAddressError):
        geo.tile_box(geo.level_count - 1, geo.level_tiles[-1][0], 0)


def test_reader_tiles_are_deepzoomgenerators_tiles(results):
    """The same slide through our reader and through DeepZoomGenerator: same tile sizes at every level,
    the same pixels where no resampling happens (the full-resolution level) and close elsewhere."""
    path = results["slides"]["svs"]
    ours, theirs = ReaderTiles(open_slide(path, backend="tifffile")), OpenSlideTiles(path)
    try:
        assert ours.geometry == theirs.geometry
        geo = ours.geometry
        for z in range(geo.level_count):
            cols, rows = geo.level_tiles[z]
            for c, r in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
                a = np.asarray(Image.open(io.BytesIO(ours.render(z, c, r))), dtype=np.int16)
                b = np.asarray(Image.open(io.BytesIO(theirs.render(z, c, r))), dtype=np.int16)
                assert a.shape == b.shape == (*geo.tile_box(z, c, r)[:1:-1], 3)
                if z == geo.level_count - 1:
                    assert np.array_equal(a, b)
                else:  # OpenSlide maps through its 1.9999 / 3.9997 downsamples; thumbnail() vs resize()
                    assert np.abs(a - b).mean() < 8, (z, c, r)
    finally:
        ours.close()
        theirs.close()


# ------------------------------------------------------------------------------------------------
# The tile cache
# ------------------------------------------------------------------------------------------------


def test_cache_is_bounded_and_least_recently_used():
    cache = TileCache(max_bytes=300)
    for key in "abc":
        cache.get(key, lambda: b"x" * 100)
    assert cache.get("a", lambda: pytest.fail("a is cached")) == (b"x" * 100, True)  # a: the most recent
    cache.get("d", lambda: b"y" * 100)  # 400 bytes > 300: drops b, the least recently used
    assert cache.nbytes == 300 and len(cache) == 3
    assert cache.get("b", lambda: b"z" * 100) == (b"z" * 100, False)  # rendered again; drops c
    assert cache.get("a", lambda: pytest.fail("a is cached"))[1] and not cache.get("c", lambda: b"c")[1]
    assert cache.nbytes <= 300
    assert TileCache(max_bytes=50).get("big", lambda: b"x" * 100) == (b"x" * 100, False)  # too big: not kept


def test_cache_renders_a_missing_tile_once_for_concurrent_callers():
    calls, gate = [], threading.Event()

    def render():
        calls.append(1)
        gate.wait(5)
        return b"tile"

    cache = TileCache()
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(cache.get("k", render))) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and [d for d, _ in out] == [b"tile"] * 6


def test_cache_does_not_keep_failures():
    cache = TileCache()

    def boom():
        raise OSError("damaged")

    with pytest.raises(OSError):
        cache.get("k", boom)
    assert cache.get("k", lambda: b"ok") == (b"ok", False) and len(cache) == 1


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------


def test_slide_list_in_review_order_with_the_overlays_colour_map(server, results):
    status, _, body = get(server.url + "data/slides.json")
    doc = json.loads(body)
    assert status == 200 and {s["id"] for s in doc["slides"]} == set(results["ids"].values())
    scores = [s["slide_score"] for s in doc["slides"]]
    assert scores == sorted(scores, reverse=True) and all(s["synthetic"] for s in doc["slides"])
    assert np.array_equal(np.asarray(doc["colormap"]["lut"]), INFERNO_LUT)
    status, headers, js = get(server.url + "data/slides.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert js.decode().startswith('wsiViewData("slides", ') and json.loads(js.decode()[22:-3]) == doc


@pytest.mark.parametrize("layout, backend, mpp, mpp_source", [
    ("tiff", "tifffile", 0.243, "tiff.XResolution (centimeter)"),
    ("svs", "openslide", 0.25, "openslide.mpp-x"),
    ("nompp", "tifffile", 0.226, "override"),
])
def test_info_of_each_slide_layout(server, results, layout, backend, mpp, mpp_source):
    slide_id = results["ids"][layout]
    status, _, body = get(f"{server.url}data/{slide_id}/info.json")
    info = json.loads(body)
    run_dir = results["out"] / slide_id
    record = json.loads((run_dir / "run.json").read_text())
    assert status == 200 and info["error"] is None and info["synthetic"]
    assert info["slide"]["backend"] == backend and info["slide"]["mpp"] == pytest.approx(mpp)
    assert info["slide"]["mpp_source"].startswith(mpp_source.split(" ")[0])
    assert [info["slide"]["width"], info["slide"]["height"]] == record["slide"]["level0_size"]
    heat = read_heatmap_tiff(run_dir / "heatmap.tif")
    assert info["heatmap"]["shape_rc"] == list(heat.shape_rc) and info["heatmap"]["cell_l0"] == heat.cell_l0
    png = Image.open(io.BytesIO(__import__("base64").b64decode(info["heatmap"]["png"].split(",", 1)[1])))
    la = np.asarray(png)
    assert png.mode == "LA" and la.shape[:2] == heat.shape_rc
    assert np.array_equal(la[..., 0], np.rint(heat.prob * 255).astype(np.uint8))
    # predicted: every patch's cell (tiles.csv), also those whose probability rounds to 0 in heatmap.tif
    patches = np.loadtxt(run_dir / "tiles.csv", delimiter=",", skiprows=1, usecols=(0, 1), ndmin=2)
    rc = np.rint((patches[:, ::-1] + record["grid"]["offset_l0"]) / record["grid"]["cell_l0"]).astype(int)
    predicted = np.zeros(heat.shape_rc, bool)
    predicted[rc[:, 0], rc[:, 1]] = True
    assert record["heatmap"]["merge"] == "centre" and np.array_equal(la[..., 1] > 0, predicted)
    assert (predicted & ~heat.predicted).any()  # the cells heatmap.tif alone would leave out
    features = json.loads((run_dir / "tumor.geojson").read_text())["features"]
    assert len(info["regions"]) == len(features) == record["counts"]["n_regions"] > 0
    maxes = [r["max_prob"] for r in info["regions"]]
    assert maxes == sorted(maxes, reverse=True)
    assert info["threshold"] == 0.5


@pytest.mark.parametrize("layout", ["tiff", "svs"])
def test_tiles_have_their_deep_zoom_size_and_cache_headers(server, results, layout):
    slide_id = results["ids"][layout]
    info = json.loads(get(f"{server.url}data/{slide_id}/info.json")[2])
    geo = DeepZoomGeometry(info["slide"]["width"], info["slide"]["height"])
    status, headers, dzi = get(f"{server.url}data/{slide_id}/slide.dzi")
    assert status == 200 and f'Width="{geo.width}"' in dzi.decode() and 'TileSize="254"' in dzi.decode()
    for z in (geo.level_count - 1, geo.level_count - 4, 2):
        cols, rows = geo.level_tiles[z]
        for c, r in {(0, 0), (cols - 1, rows - 1), (cols // 2, rows // 2)}:
            status, headers, body = get(f"{server.url}data/{slide_id}/slide_files/{z}/{c}_{r}.jpeg")
            assert status == 200 and headers["content-type"] == "image/jpeg"
            assert jpeg_size(body) == geo.tile_box(z, c, r)[2:]
            assert "immutable" in headers["cache-control"] and "X-WSI-Tile-Error" not in headers
    z = geo.level_count - 1
    url = f"{server.url}data/{slide_id}/slide_files/{z}/1_1.jpeg"
    first, second = get(url), get(url)
    assert second[1]["x-wsi-cache"] == "hit" and first[2] == second[2]


@pytest.mark.parametrize("path", [
    "/data/{id}/slide_files/99/0_0.jpeg", "/data/{id}/slide_files/3/9999_0.jpeg", "/data/{id}/slide_files/x/0_0.jpeg",
    "/data/{id}/slide_files/3/0_0.png", "/data/nope/info.json", "/data/nope/slide_files/0/0_0.jpeg",
    "/static/nope.js",
])
def test_unknown_urls_are_404(server, results, path):
    status, _, _ = get(server.url.rstrip("/") + path.format(id=results["ids"]["tiff"]))
    assert status == 404


TRAVERSALS = [
    "/data/../../../../etc/passwd", "/data/..%2f..%2f..%2fetc%2fpasswd/info.json",
    "/data/%2e%2e/%2e%2e/etc/passwd", "/data/%2e%2e%2f%2e%2e%2fetc%2fpasswd/slide.dzi",
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py", "/static/%2e%2e%2fserver.py",
    "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/data//etc/passwd/info.json",
    "/data/{id}/../../run.json", "/data/{id}/%2e%2e%2frun.json", "/data/{id}/slide_files/../../../run.json",
    "/data/{id}/slide_files/0/..%2f..%2frun.json", "/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd",
    "/static/vendor/../../server.py", "/static/vendor/%2e%2e/%2e%2e/catalogue.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_paths_outside_what_it_serves_are_not_reachable(server, results, path):
    status, body = raw_get(server, path.format(id=results["ids"]["tiff"]))
    assert status in (400, 404), (path, status)
    assert b"root:" not in body and b"schema_version" not in body and b"def create_app" not in body


def test_answers_only_loopback_host_names(server):
    assert raw_get(server, "/data/slides.json", host="evil.example")[0] == 400
    assert raw_get(server, "/data/slides.json", host=f"localhost:{server.port}")[0] == 200


def test_binds_loopback_by_default():
    srv = ViewerServer(create_app(Catalogue([], root=None)))
    try:
        assert srv.sock.getsockname()[0] == "127.0.0.1" and srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.sock.close()


def test_page_and_vendored_viewer_are_served(server):
    status, headers, page = get(server.url)
    assert status == 200 and b"static/vendor/openseadragon.min.js" in page
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, osd = get(server.url + "static/vendor/openseadragon.min.js")
    assert status == 200 and osd.startswith(b"//! openseadragon 6.")
    assert get(server.url + "static/vendor/LICENSE.openseadragon")[0] == 200
    links = re.findall(rb'(?:src|href)="([^"]*)"', page)
    assert links and all(not link.startswith((b"http", b"//")) for link in links)  # nothing from a CDN


# ------------------------------------------------------------------------------------------------
# Links out of the results folder, damaged and unreadable slides
# ------------------------------------------------------------------------------------------------


def copy_results(results, tmp_path, layout: str) -> Path:
    src = results["out"] / results["ids"][layout]
    dst = tmp_path / "out" / src.name
    shutil.copytree(src, dst)
    return dst


def test_links_out_of_the_results_folder_are_not_followed(results, tmp_path):
    run_dir = copy_results(results, tmp_path, "tiff")
    secret = tmp_path / "secret.geojson"
    secret.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    (run_dir / "tumor.geojson").unlink()
    (run_dir / "tumor.geojson").symlink_to(secret)
    outside = tmp_path / "elsewhere"
    shutil.copytree(results["out"] / results["ids"]["svs"], outside)
    (tmp_path / "out" / "linked").symlink_to(outside, target_is_directory=True)
    catalogue = Catalogue.from_results(tmp_path / "out")
    assert [e.id for e in catalogue.entries] == [run_dir.name]  # the linked folder is not served
    view = catalogue.view(run_dir.name)
    assert view.regions is None and "not a file inside" in view.regions_error
    assert view.heatmap is not None and view.error is None


def garble_tile(src: Path, dst: Path, page: int, tile_index: int) -> None:
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset, count = tif.pages[page].dataoffsets[tile_index], tif.pages[page].databytecounts[tile_index]
    data[offset: offset + count] = np.random.default_rng(5).integers(0, 256, count, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("layout", ["tiff", "svs"])
def test_a_damaged_tile_is_an_error_tile_and_the_server_goes_on(results, tmp_path, layout):
    run_dir = copy_results(results, tmp_path, layout)
    bad = tmp_path / Path(results["slides"][layout]).name
    garble_tile(results["slides"][layout], bad, 0, 0)  # level-0 tile (0, 0): Deep Zoom tile 0_0 at full size
    catalogue = Catalogue.from_slide(bad, run_dir)
    srv = ViewerServer(create_app(catalogue, workers=2)).start()
    try:
        slide_id = catalogue.entries[0].id
        info = json.loads(get(f"{srv.url}data/{slide_id}/info.json")[2])
        geo = DeepZoomGeometry(info["slide"]["width"], info["slide"]["height"])
        z = geo.level_count - 1
        status, headers, body = get(f"{srv.url}data/{slide_id}/slide_files/{z}/0_0.jpeg")
        assert status == 200 and "cannot be read" in headers["x-wsi-tile-error"]
        assert headers["cache-control"] == "no-store" and jpeg_size(body) == geo.tile_box(z, 0, 0)[2:]
        for c, r in ((5, 5), (6, 5)):  # far from the damage: served, also after OpenSlide's error state
            status, headers, body = get(f"{srv.url}data/{slide_id}/slide_files/{z}/{c}_{r}.jpeg")
            assert status == 200 and "x-wsi-tile-error" not in {k.lower() for k in headers}
        assert get(f"{srv.url}data/slides.json")[0] == 200
    finally:
        srv.stop()
        catalogue.close()


def test_an_unreadable_slide_is_a_message_and_error_tiles(results, tmp_path):
    run_dir = copy_results(results, tmp_path, "tiff")
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(Path(results["slides"]["tiff"]).read_bytes()[:4000])
    catalogue = Catalogue([Catalogue.from_slide(bad, run_dir).entries[0],
                           Catalogue.from_results(results["out"]).entry(results["ids"]["svs"])])
    srv = ViewerServer(create_app(catalogue, workers=2)).start()
    try:
        info = json.loads(get(f"{srv.url}data/{run_dir.name}/info.json")[2])
        assert "cannot be read" in info["error"] and "truncated.tif" in info["error"]
        assert info["heatmap"] is not None and info["regions"]  # the results are still shown
        z = DeepZoomGeometry(info["slide"]["width"], info["slide"]["height"]).level_count - 1
        status, headers, _ = get(f"{srv.url}data/{run_dir.name}/slide_files/{z}/0_0.jpeg")
        assert status == 200 and "x-wsi-tile-error" in {k.lower() for k in headers}
        other = results["ids"]["svs"]
        assert json.loads(get(f"{srv.url}data/{other}/info.json")[2])["error"] is None
        assert get(f"{srv.url}data/{other}/slide_files/{z - 3}/0_0.jpeg")[0] == 200
    finally:
        srv.stop()
        catalogue.close()


def test_a_different_slide_than_the_results_were_made_from_is_refused(results):
    run_dir = results["out"] / results["ids"]["tiff"]
    catalogue = Catalogue.from_slide(results["slides"]["svs"], run_dir)  # 0.25 um/px: another size
    info = catalogue.view(catalogue.entries[0].id).info()
    assert "results were made from" in info["error"]


def test_failed_rows_of_the_summary_are_listed_with_their_error(results, model_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(results["out"] / results["ids"]["tiff"], out / results["ids"]["tiff"])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"not a slide")
    run_batch([broken], model_dir, out, RunConfig(inference=InferenceConfig(progress=False)))
    catalogue = Catalogue.from_results(out)
    rows = catalogue.summary()
    assert [r["status"] for r in rows] == ["ok", "failed"] and "broken.tif" in rows[1]["error"]


def test_not_a_results_folder_says_so(tmp_path):
    with pytest.raises(ViewerError, match="no wsi-infer results"):
        Catalogue.from_results(tmp_path)


# ------------------------------------------------------------------------------------------------
# The static export and the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_results(model_dir, tmp_path_factory):
    """A SYNTHETIC slide small enough to export in a few seconds."""
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    root = tmp_path_factory.mktemp("view_small")
    slide = write_synthetic_slide(root / "small.tif", make_spec(tissue_mm2=0.1, n_tumors=1, faint=False, pen=False,
                                                                seed=4), mpp=0.5, tile=256)
    run_batch([slide.path], model_dir, root / "out", RunConfig(inference=InferenceConfig(progress=False)))
    return root / "out"


def test_export_writes_every_tile_and_the_page(small_results, tmp_path):
    catalogue = Catalogue.from_results(small_results)
    site = tmp_path / "site"
    report = export_site(catalogue, site, workers=2)
    view = catalogue.view("small")
    geo = view.geometry
    tiles = sorted((site / "data" / "small" / "slide_files").rglob("*.jpeg"))
    assert report.tiles == geo.tile_count == len(tiles) and report.error_tiles == 0
    for z in (geo.level_count - 1, 0):
        c, r = geo.level_tiles[z][0] - 1, geo.level_tiles[z][1] - 1
        path = site / "data" / "small" / "slide_files" / str(z) / f"{c}_{r}.jpeg"
        assert path.read_bytes() == view.tiles.render(z, c, r)
    assert (site / "index.html").is_file() and (site / "static" / "vendor" / "openseadragon.min.js").is_file()
    assert json.loads((site / "data" / "small" / "info.json").read_text()) == view.info()
    assert (site / "data" / "slides.js").read_text().startswith('wsiViewData("slides"')
    assert not [p for p in tmp_path.iterdir() if p.name != "site"]  # no temporary folder left
    again = export_site(catalogue, site, workers=2)  # an earlier export is replaced
    assert again.tiles == report.tiles and (site / SITE_MARKER).is_file()
    catalogue.close()


def test_export_refuses_a_folder_it_did_not_write(small_results, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ViewerError, match="not written by wsi-view"):
        export_site(Catalogue.from_results(small_results), tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_cli_exports_a_results_folder_and_a_slide_with_results(small_results, tmp_path, capsys):
    from wsi_toolkit.cli.view import main

    assert main([str(small_results), "--export", str(tmp_path / "a"), "--workers", "2"]) == 0
    record = json.loads((small_results / "small" / "run.json").read_text())
    assert main([record["slide"]["path"], "--results", str(small_results / "small"), "--export",
                 str(tmp_path / "b")]) == 0
    assert "wrote" in capsys.readouterr().err
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert main([str(small_results), "--results", str(small_results)]) == 2  # --results needs a slide file


def test_cli_serves_on_loopback_and_prints_the_url(small_results):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "wsi_toolkit.cli.view", str(small_results)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert json.loads(get(url + "data/slides.json")[2])["slides"][0]["id"] == "small"
    finally:
        proc.terminate()
        proc.wait(10)
