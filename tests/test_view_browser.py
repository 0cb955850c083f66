"""wsi-view in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

One server on SYNTHETIC results of the three slide layouts (plus one unreadable slide), one page
shared by the tests in order. They check what is drawn: tiles of both layers arrive with their Deep
Zoom sizes, the heatmap's colour over the drawn tumour and over normal tissue (screenshot pixels
against the overlay's colour map), exact alignment at a cell edge zoomed in, the region list, the
sliders, the keyboard, the scale bar, an unreadable slide's message, and the static export from a
plain static file server and from disk. Screenshots go to ``$WSI_TOOLKIT_SCREENSHOTS`` (else the
test's temporary folder). Skips, saying why, where Playwright or Chromium cannot be had.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from wsi_toolkit.export import INFERNO_LUT, UNCERTAINTY_TIFF_CONTENT, read_heatmap_tiff
from wsi_toolkit.inference import InferenceConfig
from wsi_toolkit.pipeline import RunConfig, run_batch
from wsi_toolkit.view import Catalogue, DeepZoomGeometry, ViewerServer, create_app, export_site

pytest.importorskip("fastapi", reason="the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]'")
pytest.importorskip("uvicorn", reason="the wsi-view server needs the view extra: pip install 'wsi-toolkit[view]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright for Python: pip install "
                               "'wsi-toolkit[view]' (no browser download: they use the system's Chromium)")

pytestmark = pytest.mark.timeout(300)

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
VIEWPORT = {"width": 1280, "height": 800}


def find_chromium() -> str | None:
    explicit = os.environ.get("WSI_TOOLKIT_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no Chromium: install Debian's chromium (apt-get install chromium; .ci/run does) or set "
                    "WSI_TOOLKIT_CHROMIUM to a Chromium binary")
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except Exception as exc:  # noqa: BLE001 - any launch failure is a reason to skip, shown as is
            pytest.skip(f"Chromium at {exe} does not start under Playwright: {str(exc).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("WSI_TOOLKIT_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def results(synthetic_slides, model_dir, tmp_path_factory):
    """OUT with a generic TIFF, an SVS read by OpenSlide and an SVS without mpp (--mpp), all SYNTHETIC;
    plus the truth of the TIFF (its drawn tumours) and an unreadable copy of it with its results."""
    root = tmp_path_factory.mktemp("view_browser")
    truth = synthetic_slides(0.243, "tiff")
    slides = {"tiff": truth.path, "svs": synthetic_slides(0.25, "svs").path,
              "nompp": synthetic_slides(0.226, "svs-nompp").path}
    out = root / "out"
    inf = InferenceConfig(progress=False)
    run_batch([slides["tiff"]], model_dir, out, RunConfig(inference=inf))
    run_batch([slides["svs"]], model_dir, out, RunConfig(inference=inf, backend="openslide"))
    run_batch([slides["nompp"]], model_dir, out, RunConfig(inference=inf, mpp_override=0.226))
    broken_dir = root / "broken_results" / "zz_broken"
    shutil.copytree(out / Path(slides["tiff"]).stem, broken_dir)
    broken = root / "zz_broken.tif"
    broken.write_bytes(Path(slides["tiff"]).read_bytes()[:4000])
    return {"out": out, "truth": truth, "ids": {k: Path(p).stem for k, p in slides.items()},
            "broken": (broken, broken_dir)}


@pytest.fixture(scope="module")
def server(results):
    good = Catalogue.from_results(results["out"])
    broken = Catalogue.from_slide(*results["broken"]).entries[0]
    catalogue = Catalogue([*good.entries, broken])
    srv = ViewerServer(create_app(catalogue, workers=2)).start()
    yield srv
    srv.stop()
    catalogue.close()


class Page:
    """The one page of the module, with the responses it received."""

    def __init__(self, page):
        self.page = page
        self.responses: list = []
        self.errors: list[str] = []
        page.on("response", lambda r: self.responses.append(r))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def idle(self, timeout_ms: int = 60_000) -> None:
        self.page.wait_for_function("window.wsiView && window.wsiView.isIdle()", timeout=timeout_ms)
        self.page.wait_for_timeout(150)  # the frame after the last tile is drawn

    def screenshot(self, path: Path | None = None) -> np.ndarray:
        png = self.page.screenshot(path=str(path) if path else None)
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)

    def screen_xy(self, l0_x: float, l0_y: float) -> tuple[float, float]:
        """Page pixel of a level-0 point, from OpenSeadragon's own mapping of the slide layer."""
        return tuple(self.page.evaluate("""([x, y]) => {
            const item = wsiView.state.slideItem, box = document.getElementById('osd').getBoundingClientRect();
            const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
            return [box.left + p.x, box.top + p.y]; }""", [l0_x, l0_y]))

    def state(self, expr: str):
        return self.page.evaluate(f"() => {expr}")


@pytest.fixture(scope="module")
def page(browser, server, results):
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)  # CSP: Playwright evaluates strings
    p = Page(context.new_page())
    p.page.goto(f"{server.url}#slide={results['ids']['tiff']}")  # the slide whose drawn tumours we know
    p.idle()
    yield p
    context.close()


def sample(img: np.ndarray, xy, r: int = 1) -> np.ndarray:
    x, y = (int(round(v)) for v in xy)
    assert r <= x < img.shape[1] - r and r <= y < img.shape[0] - r, f"{xy} is off the screen"
    return img[y - r: y + r + 1, x - r: x + r + 1].reshape(-1, 3).mean(axis=0)


def expected_blend(base: np.ndarray, value: int, alpha: float) -> np.ndarray:
    return (1 - alpha) * base + alpha * INFERNO_LUT[value].astype(np.float64)


@pytest.fixture(scope="module")
def points(results):
    """Level-0 points at the centres of a tumour cell deep inside the drawn tumour and of a normal
    predicted cell well away from it, with their heatmap values (x 255, as drawn)."""
    run_dir = results["out"] / results["ids"]["tiff"]
    heat = read_heatmap_tiff(run_dir / "heatmap.tif")
    v = np.rint(heat.prob * 255).astype(int)
    grid = json.loads((run_dir / "run.json").read_text())["grid"]
    patches = np.loadtxt(run_dir / "tiles.csv", delimiter=",", skiprows=1, usecols=(0, 1), ndmin=2)
    rc = np.rint((patches[:, ::-1] + grid["offset_l0"]) / grid["cell_l0"]).astype(int)
    predicted = np.zeros(heat.shape_rc, bool)  # every patch's cell (centre merge), as the page draws it
    predicted[rc[:, 0], rc[:, 1]] = True
    cell = heat.cell_l0
    tumor = results["truth"].tumor_l0
    rows, cols = heat.shape_rc
    best_t = best_n = None
    for r in range(1, rows - 1):
        for c in range(1, cols - 1):
            block = v[r - 1: r + 2, c - 1: c + 2]
            if not predicted[r - 1: r + 2, c - 1: c + 2].all() or 60 < v[r, c] < 240:
                continue
            centre = shapely.Point((c + 0.5) * cell, (r + 0.5) * cell)
            inside, d = tumor.contains(centre), tumor.boundary.distance(centre)
            if inside and d > 0.5 * cell and v[r, c] >= 240 and (best_t is None or block.min() > best_t[3]):
                best_t = ((centre.x, centre.y), (r, c), int(v[r, c]), int(block.min()))
            if not inside and d > 8 * cell and block.max() <= 60 and best_n is None:
                best_n = ((centre.x, centre.y), (r, c), int(v[r, c]), int(block.min()))
    assert best_t and best_n, "the synthetic slide has no clear tumour and normal cell"
    return {"tumor": best_t, "normal": best_n, "heat": heat, "values": v, "predicted": predicted}


# ------------------------------------------------------------------------------------------------
# In the order a reviewer would: whole slide, a region, the sliders, the next slide
# ------------------------------------------------------------------------------------------------


def test_tiles_of_both_layers_arrive_with_their_deep_zoom_sizes(page, results):
    info = page.state("wsiView.state.info")
    assert info["id"] == results["ids"]["tiff"] and info["slide"]["backend"] == "tifffile"
    geo = DeepZoomGeometry(info["slide"]["width"], info["slide"]["height"])
    tiles = [r for r in page.responses if "/slide_files/" in r.url]
    assert len(tiles) >= 4
    for resp in tiles:
        z, c, r = map(int, re.search(r"/slide_files/(\d+)/(\d+)_(\d+)\.jpeg", resp.url).groups())
        assert resp.status == 200 and resp.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(resp.body())).size == geo.tile_box(z, c, r)[2:]
    data = [r for r in page.responses if r.url.endswith(("/info.js", "/slides.js"))]
    assert len(data) >= 2 and all(r.status == 200 for r in data)
    log = page.state("wsiView.state.tileLog")
    heat = {(t["level"], t["x"], t["y"]): (t["w"], t["h"]) for t in log if t["layer"] == "heatmap"}
    slide = {(t["level"], t["x"], t["y"]) for t in log if t["layer"] == "slide"}
    assert heat and set(heat) & slide  # the heatmap layer is cut on the slide's own tile grid...
    for (z, c, r), size in heat.items():  # ...with the slide tiles' sizes
        assert size == geo.tile_box(z, c, r)[2:]
    assert not page.errors, page.errors


def test_heatmap_sits_over_the_tumour_in_the_overlays_colours(page, points, shots):
    on = page.screenshot(shots / "view_whole.png")
    page.page.keyboard.press("h")  # heatmap off
    page.idle()
    off = page.screenshot(shots / "view_whole_heatmap_off.png")
    page.page.keyboard.press("h")
    page.idle()
    alpha = page.state("wsiView.state.opacity")
    for name in ("tumor", "normal"):
        centre, _, value, _ = points[name]
        xy = page.screen_xy(*centre)
        got, base = sample(on, xy), sample(off, xy)
        want = expected_blend(base, value, alpha)
        assert np.abs(got - want).max() <= 10, (name, got, want, base)
    # the tumour reads bright (p ~ 1: pale yellow), normal tissue dark (p ~ 0: black)
    t, n = sample(on, page.screen_xy(*points["tumor"][0])), sample(on, page.screen_xy(*points["normal"][0]))
    assert t.mean() > n.mean() + 60


def test_regions_list_and_hover_match_tumor_geojson(page, results):
    features = json.loads((results["out"] / results["ids"]["tiff"] / "tumor.geojson").read_text())["features"]
    items = page.page.locator("#regions li")
    assert items.count() == len(features) > 0
    best = max(f["properties"]["measurements"]["max_probability"] for f in features)
    assert f"{best:.3f}" in items.first.inner_text()
    region = page.state("wsiView.state.info.regions[0]")
    inner = shapely.Polygon(region["polygons"][0][0], region["polygons"][0][1:]).representative_point()
    page.page.mouse.move(*page.screen_xy(inner.x, inner.y))
    tip = page.page.locator("#tooltip")
    tip.wait_for(state="visible", timeout=5000)
    text = tip.inner_text()
    assert f"{region['area_mm2']:.3f} mm²" in text and f"{region['longest_diameter_um']:.0f} µm" in text
    assert f"max p {region['max_prob']:.3f}" in text and f"mean p {region['mean_prob']:.3f}" in text
    page.page.mouse.move(5, 5)


def test_zoomed_into_a_region_the_heatmap_edges_are_the_cell_edges(page, points, shots):
    page.page.keyboard.press("]")  # next region: the first, highest max probability; zooms to it
    page.idle()
    assert page.state("wsiView.state.region") == 0
    page.screenshot(shots / "view_region.png")
    page.page.keyboard.press("o")  # outlines off: they are drawn over both layers, on the cell edges
    page.page.keyboard.press("h")
    page.idle()
    off = page.screenshot()
    page.page.keyboard.press("h")
    page.idle()
    on = page.screenshot()
    page.page.keyboard.press("o")
    heat, v = points["heat"], points["values"]
    cell = heat.cell_l0
    region = page.state("wsiView.state.info.regions[0]")
    x0, y0, x1, y1 = region["bbox_l0"]
    alpha = page.state("wsiView.state.opacity")
    scale = page.screen_xy(cell, 0)[0] - page.screen_xy(0, 0)[0]
    assert scale >= 24, "zoomed in: a heatmap cell spans many screen pixels"
    checked = 0
    for r in range(int(y0 // cell), int(y1 // cell)):
        for c in range(int(x0 // cell), int(x1 // cell)):
            a, b = v[r, c], v[r, c + 1]
            if not (points["predicted"][r, c] and points["predicted"][r, c + 1]) or abs(int(a) - int(b)) < 120:
                continue
            edge_x, mid_y = (c + 1) * cell, (r + 0.5) * cell
            ex, ey = page.screen_xy(edge_x, mid_y)
            for dx, value in ((-2.5, a), (2.5, b)):  # 2.5 screen px either side of the cell edge
                xy = (ex + dx, ey)
                want = expected_blend(sample(off, xy, r=0), int(value), alpha)
                assert np.abs(sample(on, xy, r=0) - want).max() <= 12, (r, c, dx)
            checked += 1
    assert checked >= 2


def test_scale_bar_and_synthetic_label(page):
    assert page.page.locator("#synthetic").is_visible()
    label = page.page.locator("#scalebar-label").inner_text()
    value, unit = re.fullmatch(r"([0-9.]+) (µm|mm)", label).groups()
    um = float(value) * (1000 if unit == "mm" else 1)
    bar_px = page.page.locator("#scalebar-line").bounding_box()["width"]
    # um per screen px from where OpenSeadragon draws the slide (the frame the heatmap test checks)
    x0, y0 = page.screen_xy(0, 0)
    x1, y1 = page.screen_xy(10_000, 0)
    um_per_px = 10_000 * page.state("wsiView.state.info.slide.mpp") / np.hypot(x1 - x0, y1 - y0)
    assert abs(bar_px * um_per_px - um) / um < 0.01
    assert 20 <= bar_px <= 145


def test_sliders_change_what_is_drawn(page, points):
    page.page.keyboard.press("0")  # OpenSeadragon: whole slide
    page.idle()
    xy_t, xy_n = page.screen_xy(*points["tumor"][0]), page.screen_xy(*points["normal"][0])
    before = page.screenshot()
    page.page.locator("#threshold").fill("0.5")
    page.idle()
    thresholded = page.screenshot()
    page.page.keyboard.press("h")
    page.idle()
    off = page.screenshot()
    page.page.keyboard.press("h")
    page.page.locator("#opacity").fill("1")
    page.idle()
    opaque = page.screenshot()
    page.page.locator("#opacity").fill("0.5")
    page.page.locator("#threshold").fill("0")
    page.idle()
    # threshold 0.5: the normal cell is no longer drawn, the tumour cell still is
    assert np.abs(sample(thresholded, xy_n) - sample(off, xy_n)).max() <= 3
    assert np.abs(sample(before, xy_n) - sample(off, xy_n)).max() > 30
    assert np.abs(sample(thresholded, xy_t) - sample(before, xy_t)).max() <= 3
    # opacity 1: the colour map's own colour
    assert np.abs(sample(opaque, xy_t) - INFERNO_LUT[points["tumor"][2]]).max() <= 10
    assert page.page.locator("#threshold-value").inner_text() == "0.00"


def test_keyboard_walks_the_slides_in_review_order(page, results):
    assert page.page.locator("#slides li").count() == 4
    scores = page.state("wsiView.state.slides.map(s => s.slide_score)")
    assert scores == sorted(scores, reverse=True)  # the unreadable slide's results keep their score
    start = page.state("wsiView.state.index")
    seen = {}
    for _ in range(3):
        page.page.keyboard.press("n")
        page.idle()
        seen[page.state("wsiView.state.info.id")] = page.state("wsiView.state.info.slide")
    assert seen[results["ids"]["svs"]]["backend"] == "openslide"
    assert seen[results["ids"]["nompp"]]["mpp_source"] == "override"
    assert seen[results["ids"]["nompp"]]["mpp"] == pytest.approx(0.226)
    page.page.keyboard.press("p")
    page.idle()
    assert page.state("wsiView.state.index") == (start + 2) % 4


def test_an_unreadable_slide_is_a_message_in_the_page(page, shots):
    n = page.state("wsiView.state.slides.length")
    broken = page.state("wsiView.state.slides.findIndex(s => s.id === 'zz_broken')")
    page.page.evaluate(f"wsiView.loadSlide({broken})")
    page.idle()
    page.screenshot(shots / "view_unreadable.png")
    messages = page.page.locator("#messages").inner_text()
    assert "cannot be read" in messages and "zz_broken.tif" in messages
    errors = [r for r in page.responses if "/zz_broken/slide_files/" in r.url]
    assert errors and all(r.status == 200 and "x-wsi-tile-error" in r.headers for r in errors)
    page.page.evaluate("wsiView.loadSlide(0)")  # the server goes on
    page.idle()
    assert page.state("wsiView.state.messages.length") == 0 and n == 4


def test_export_works_from_a_plain_static_server_and_from_disk(browser, results, points, tmp_path, shots):
    catalogue = Catalogue.from_slide(results["truth"].path, results["out"] / results["ids"]["tiff"])
    site = tmp_path / "site"
    export_site(catalogue, site, workers=2)
    catalogue.close()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    try:
        for url in (f"http://127.0.0.1:{httpd.server_address[1]}/", (site / "index.html").as_uri()):
            p = Page(context.new_page())
            p.page.goto(url)
            p.idle()
            img = p.screenshot(shots / ("export_http.png" if url.startswith("http") else "export_file.png"))
            if url.startswith("http"):
                tiles = [r for r in p.responses if "/slide_files/" in r.url]
                assert tiles and all(r.status == 200 for r in tiles)
            assert p.state("wsiView.state.tileLog.filter(t => t.layer === 'slide').length") > 0
            assert p.state("wsiView.state.heat !== null && wsiView.state.tileErrors === 0")
            assert not p.errors, (url, p.errors)
            p.page.keyboard.press("h")
            p.idle()
            off = p.screenshot()
            xy = p.screen_xy(*points["tumor"][0])
            want = expected_blend(sample(off, xy), points["tumor"][2], 0.5)
            assert np.abs(sample(img, xy) - want).max() <= 10, url
            p.page.close()
    finally:
        context.close()
        httpd.shutdown()


# ------------------------------------------------------------------------------------------------
# The uncertainty layer of a wsi-infer --tta run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tta_results(results, asym_model_dir, tmp_path_factory):
    """The drawn-tumour slide run with --tta dihedral by a model that is not rotation-invariant (the
    colour-rule model is: its views would not differ), at stride 96 (large cells, few patches)."""
    out = tmp_path_factory.mktemp("view_tta") / "out"
    inf = InferenceConfig(progress=False, tta="dihedral", runtime="torch")
    run_batch([results["truth"].path], asym_model_dir, out, RunConfig(inference=inf, stride_px=96))
    run_dir = out / results["truth"].path.stem
    assert (run_dir / "uncertainty.tif").is_file()
    return run_dir


def _uncertainty_cells(run_dir: Path):
    """Level-0 centres and values (std x 255, as uncertainty.tif stores them) of the predicted cells with
    the largest and the smallest spread, and of a cell that was not predicted."""
    unc = read_heatmap_tiff(run_dir / "uncertainty.tif", content=UNCERTAINTY_TIFF_CONTENT)
    v = np.rint(unc.prob * 255).astype(int)
    grid = json.loads((run_dir / "run.json").read_text())["grid"]
    patches = np.loadtxt(run_dir / "tiles.csv", delimiter=",", skiprows=1, usecols=(0, 1), ndmin=2)
    rc = np.rint((patches[:, ::-1] + grid["offset_l0"]) / grid["cell_l0"]).astype(int)
    predicted = np.zeros(unc.shape_rc, bool)
    predicted[rc[:, 0], rc[:, 1]] = True
    cell = unc.cell_l0
    inner = [(r, c) for r, c in rc.tolist() if 0 < r < unc.shape_rc[0] - 1 and 0 < c < unc.shape_rc[1] - 1]
    hi = max(inner, key=lambda rc_: v[rc_])
    lo = min(inner, key=lambda rc_: v[rc_])
    glass = next((r, c) for r in range(unc.shape_rc[0]) for c in range(unc.shape_rc[1])
                 if not predicted[max(0, r - 1): r + 2, max(0, c - 1): c + 2].any())
    centre = lambda rc_: ((rc_[1] + 0.5) * cell, (rc_[0] + 0.5) * cell)  # noqa: E731
    return {name: (centre(x), int(v[x])) for name, x in (("high", hi), ("low", lo), ("glass", glass))}, cell


def _check_uncertainty_page(p: Page, cells: dict, cell_l0: float, shot: Path | None) -> None:
    assert p.page.locator("#uncertainty-control").is_visible()
    assert p.state("wsiView.state.uncOn") is False and p.state("wsiView.state.unc !== null")
    p.page.keyboard.press("h")  # heatmap off: the slide alone
    p.idle()
    off = p.screenshot()
    p.page.keyboard.press("u")  # uncertainty on
    p.idle()
    on = p.screenshot(shot)
    assert p.state("wsiView.state.uncOn") is True and p.page.locator("#uncertainty-on").is_checked()
    assert p.state("wsiView.state.tileLog.filter(t => t.layer === 'uncertainty').length") > 0
    assert p.screen_xy(cell_l0, 0)[0] - p.screen_xy(0, 0)[0] >= 8, "a cell spans several screen px"
    alpha = p.state("wsiView.state.opacity")
    from wsi_toolkit.export import VIRIDIS_LUT

    assert cells["high"][1] - cells["low"][1] >= 10, "the views' spread varies over the slide"
    for name in ("high", "low"):
        xy, value = p.screen_xy(*cells[name][0]), cells[name][1]
        want = (1 - alpha) * sample(off, xy) + alpha * VIRIDIS_LUT[min(255, round(value / 0.5))].astype(float)
        assert np.abs(sample(on, xy) - want).max() <= 10, (name, value, sample(on, xy), want)
    glass = p.screen_xy(*cells["glass"][0])
    assert np.abs(sample(on, glass) - sample(off, glass)).max() <= 3  # nothing drawn where nothing was predicted
    p.page.keyboard.press("u")  # off again: the slide alone
    p.idle()
    again = p.screenshot()
    xy = p.screen_xy(*cells["high"][0])
    assert np.abs(sample(again, xy) - sample(off, xy)).max() <= 3
    p.page.keyboard.press("h")
    p.idle()
    assert not p.errors, p.errors


def test_uncertainty_layer_toggles_and_draws_the_views_spread(browser, results, tta_results, tmp_path, shots):
    cells, cell_l0 = _uncertainty_cells(tta_results)
    catalogue = Catalogue.from_slide(results["truth"].path, tta_results)
    srv = ViewerServer(create_app(catalogue, workers=2)).start()
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    try:
        p = Page(context.new_page())
        p.page.goto(srv.url)
        p.idle()
        _check_uncertainty_page(p, cells, cell_l0, shots / "view_uncertainty.png")
        # the static export carries the layer too (opened from disk)
        site = tmp_path / "site"
        export_site(catalogue, site, workers=2)
        q = Page(context.new_page())
        q.page.goto((site / "index.html").as_uri())
        q.idle()
        _check_uncertainty_page(q, cells, cell_l0, shots / "export_uncertainty.png")
    finally:
        context.close()
        srv.stop()
        catalogue.close()


def test_a_run_without_tta_has_no_uncertainty_control(page):
    assert page.state("wsiView.state.info.uncertainty") is None
    assert not page.page.locator("#uncertainty-control").is_visible()


# ------------------------------------------------------------------------------------------------
# Review mode: draw, label, save, reload; a write without the token
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def review_out(model_dir, tmp_path_factory):
    """A small SYNTHETIC slide's results, for review mode to save into."""
    from wsi_toolkit.synthetic import make_spec, write_synthetic_slide

    root = tmp_path_factory.mktemp("view_review")
    slide = write_synthetic_slide(root / "small.tif", make_spec(tissue_mm2=0.1, n_tumors=1, faint=False, pen=False,
                                                                seed=4), mpp=0.5, tile=256)
    run_batch([slide.path], model_dir, root / "out", RunConfig(inference=InferenceConfig(progress=False)))
    return root / "out"


def test_review_mode_draws_labels_saves_and_reloads_an_outline(browser, review_out, shots):
    from wsi_toolkit.annotations.review import read_review
    from wsi_toolkit.view import ReviewSettings

    catalogue = Catalogue.from_results(review_out)
    settings = ReviewSettings.new("dr browser")
    srv = ViewerServer(create_app(catalogue, workers=2, review=settings)).start()
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    try:
        p = Page(context.new_page())
        p.page.goto(f"{srv.url}#token={settings.token}")
        p.idle()
        assert p.page.locator("#review-tools").is_visible() and settings.token not in p.page.url
        size = p.state("[wsiView.state.info.slide.width, wsiView.state.info.slide.height]")
        corners = [(0.3, 0.3), (0.6, 0.35), (0.55, 0.6), (0.3, 0.55)]
        l0 = [(fx * size[0], fy * size[1]) for fx, fy in corners]
        p.page.click("#review-classes button[data-cls=Normal]")  # drawn as Normal ...
        p.page.click("#review-draw")
        p.idle()
        for xy in l0:
            p.page.mouse.click(*p.screen_xy(*xy))
            p.page.wait_for_timeout(350)  # apart in time: single clicks, not a double-click
        p.page.keyboard.press("Enter")
        assert p.state("wsiView.review.features.length") == 1
        p.page.click("#review-classes button[data-cls=Tumor]")  # ... relabelled Tumor while selected
        p.page.click("#review-save")
        p.page.wait_for_function("document.getElementById('review-status').textContent.includes('saved version 1')",
                                 timeout=20_000)
        p.screenshot(shots / "view_review_saved.png")
        saved = read_review(review_out / "small" / "review.geojson")
        assert saved.version == 1 and [f.classification for f in saved.features] == ["Tumor"]
        assert saved.features[0].author == "dr browser"
        px_l0 = size[0] / (p.screen_xy(size[0], 0)[0] - p.screen_xy(0, 0)[0])  # level-0 px per screen px
        got = np.asarray(saved.features[0].polygon.exterior.coords)[:-1]
        assert np.abs(got - np.asarray(l0)).max() <= 2 * px_l0 + 1, (got, l0)

        p.page.reload()  # the token stays with the tab (sessionStorage), not in the address
        p.idle()
        assert p.page.locator("body").get_attribute("data-review-count") == "1"
        assert p.page.locator("#review-list li").count() == 1 and p.page.locator("#review-group path").count() == 1
        assert "Tumor" in p.page.locator("#review-list li").first.inner_text()
        status = p.page.evaluate("""async () => (await fetch('data/small/review', {method: 'PUT',
            headers: {'Content-Type': 'application/json'}, body: JSON.stringify({type: 'FeatureCollection',
            features: [], base_version: 1})})).status""")
        assert status == 403
        assert read_review(review_out / "small" / "review.geojson").version == 1
        assert not [e for e in p.errors if "403" not in e], p.errors

        site = review_out.parent / "site"  # the static export shows the saved outline, read-only
        export_site(catalogue, site, workers=2)
        q = Page(context.new_page())
        q.page.goto((site / "index.html").as_uri())
        q.idle()
        assert q.page.locator("body").get_attribute("data-review-count") == "1"
        assert q.page.locator("#review-group path").count() == 1 and not q.page.locator("#review-tools").is_visible()
        assert q.state("wsiView.review.mode") is False and not q.errors, q.errors
    finally:
        context.close()
        srv.stop()
        catalogue.close()


def _get_json(url: str):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read()


def _draw(p: Page, corners_l0, cls: str) -> None:
    p.page.click(f"#review-classes button[data-cls={cls}]")
    p.page.click("#review-draw")
    p.idle()
    for xy in corners_l0:
        p.page.mouse.click(*p.screen_xy(*xy))
        p.page.wait_for_timeout(350)
    p.page.keyboard.press("Enter")


def test_two_tabs_saving_the_same_slide_lose_nothing(browser, review_out, tmp_path):
    """Both tabs load the same version; the second save is refused (409), the page merges its outline
    onto the saved review, and saving again keeps both tabs' outlines."""
    import shutil

    from wsi_toolkit.annotations.review import read_review
    from wsi_toolkit.view import ReviewSettings

    out = tmp_path / "out"
    shutil.copytree(review_out, out)
    (out / "small" / "review.geojson").unlink(missing_ok=True)
    shutil.rmtree(out / "small" / "review_history", ignore_errors=True)
    catalogue = Catalogue.from_results(out)
    settings = ReviewSettings.new("dr tabs")
    srv = ViewerServer(create_app(catalogue, workers=2, review=settings)).start()
    context = browser.new_context(viewport=VIEWPORT, bypass_csp=True)
    try:
        a, b = Page(context.new_page()), Page(context.new_page())
        for p in (a, b):
            p.page.goto(f"{srv.url}#token={settings.token}")
            p.idle()
        w, h = a.state("[wsiView.state.info.slide.width, wsiView.state.info.slide.height]")
        _draw(a, [(0.1 * w, 0.1 * h), (0.3 * w, 0.1 * h), (0.2 * w, 0.3 * h)], "Tumor")
        _draw(b, [(0.6 * w, 0.6 * h), (0.8 * w, 0.6 * h), (0.7 * w, 0.8 * h)], "Exclude")
        status = "document.getElementById('review-status').textContent"
        a.page.click("#review-save")
        a.page.wait_for_function(f"{status}.includes('saved version 1')", timeout=20_000)
        b.page.click("#review-save")
        b.page.wait_for_function(f"{status}.includes('merged')", timeout=20_000)
        assert read_review(out / "small" / "review.geojson").version == 1  # the refused save wrote nothing
        assert b.state("wsiView.review.features.length") == 2 and b.state("wsiView.review.version") == 1
        b.page.click("#review-save")
        b.page.wait_for_function(f"{status}.includes('saved version 2')", timeout=20_000)
        saved = read_review(out / "small" / "review.geojson")
        assert sorted(f.classification for f in saved.features) == ["Exclude", "Tumor"]
        # the queue (this slide has cells near the threshold): next zooms to its first area, says why
        items = b.state("wsiView.queue.items")
        assert items and items == json.loads(_get_json(srv.url + "data/small/queue.json"))["items"]
        b.page.keyboard.press("j")
        b.idle()
        assert b.state("wsiView.queue.index") == 0
        assert b.page.locator("#queue-detail").inner_text().startswith(f"1 of {len(items)}: {items[0]['reason']}")
        x0, y0, x1, y1 = items[0]["bbox_l0"]
        cx, cy = b.screen_xy((x0 + x1) / 2, (y0 + y1) / 2)
        box = b.page.locator("#osd").bounding_box()
        assert abs(cx - (box["x"] + box["width"] / 2)) < 5 and abs(cy - (box["y"] + box["height"] / 2)) < 5
    finally:
        context.close()
        srv.stop()
        catalogue.close()
