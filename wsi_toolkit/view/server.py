"""The ``wsi-view`` web server: the page, its data and each slide's Deep Zoom tiles, for one catalogue.

URL layout (the static export, :mod:`wsi_toolkit.view.site`, writes the same paths as files)::

    /                                        the page (static/index.html)
    /static/<file>                           page files: the package's static folder, a fixed list
    /data/slides.js | slides.json            the slide list (by slide score) and the colour map
    /data/<id>/info.js | info.json           one slide: size, mpp, heatmap (PNG data URL), regions
    /data/<id>/slide.dzi                     its Deep Zoom descriptor
    /data/<id>/slide_files/<z>/<col>_<row>.jpeg   its tiles

    /data/<id>/review.js | review.json       its saved review (review.geojson; version 0 when none)
    /data/<id>/queue.js | queue.json         its review queue: areas ranked by the model's uncertainty
    PUT /data/<id>/review                    review mode only (``--review``): save the review (guarded)

Review mode (``create_app(..., review=ReviewSettings.new(author))``) adds the one write. It is
refused with 403 without the per-start token in ``X-WSI-Token`` (compared in constant time) or with
an ``Origin`` other than the server's own (or a cross-site ``Sec-Fetch-Site``); 415 unless the body
is JSON; 413 over :attr:`ReviewSettings.max_body_bytes` (``Content-Length`` and the bytes read);
422 when the body is not a valid review of that slide
(:func:`wsi_toolkit.annotations.review.validate_review`); 404 for an id not in the catalogue; 409
when another writer saved since the version the body was based on (``base_version``). The file is
written only in the catalogue entry's own results folder, by
:func:`~wsi_toolkit.annotations.review.save_review`.

``<id>`` is looked up in the catalogue and ``<z>``, ``<col>``, ``<row>`` are parsed as integers; no
part of a URL is ever joined to a file path, so ``..`` in any spelling reaches nothing (404).
Tiles are rendered by a pool of threads (one per core by default), kept in a bounded LRU cache
and sent with ``Cache-Control`` (immutable: the page's tile URLs carry the slide file's version).
A tile that cannot be read is answered with an error tile (HTTP 200, header ``X-WSI-Tile-Error``,
not cached) so the page shows where the slide is damaged; an unreadable slide's info carries the
message. The server binds 127.0.0.1 unless told otherwise and then answers only requests whose
``Host`` is a loopback name (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.view.catalogue import Catalogue, SlideView, review_payload
from wsi_toolkit.view.tiles import TileAddressError, TileCache, TileRenderError, error_tile

__all__ = ["create_app", "ViewerServer", "ReviewSettings", "static_files", "slides_payload", "js_payload",
           "STATIC_DIR", "LOOPBACK_HOSTS", "TOKEN_HEADER"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_TILE = re.compile(r"([0-9]{1,7})_([0-9]{1,7})\.(?:jpeg|jpg)")
_LEVEL = re.compile(r"[0-9]{1,3}")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css",
          ".md": "text/plain; charset=utf-8", ".openseadragon": "text/plain; charset=utf-8",
          ".png": "image/png", ".json": "application/json"}
_CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; object-src 'none'; "
        "base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
_COMMON = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
#: The request header carrying review mode's per-start token.
TOKEN_HEADER = "X-WSI-Token"


@dataclass(frozen=True)
class ReviewSettings:
    """Review mode: ``token`` every write must carry (make one per start with :meth:`new`), the
    ``author`` saves are stamped with, and the largest request body accepted (bytes)."""

    token: str
    author: str
    max_body_bytes: int = 16 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or len(self.token) < 16:
            raise ConfigError("ReviewSettings.token must be a random string of at least 16 characters; use "
                              "ReviewSettings.new()")
        if not self.author.strip() or len(self.author) > 200:
            raise ConfigError(f"review author {self.author[:40]!r}: give a name of 1 to 200 characters (--author)")
        if not 1024 <= int(self.max_body_bytes) <= 256 * 2**20:
            raise ConfigError(f"ReviewSettings.max_body_bytes {self.max_body_bytes}: 1 KiB to 256 MiB")

    @classmethod
    def new(cls, author: str, **kwargs: Any) -> ReviewSettings:
        """Settings with a fresh random token (``secrets.token_urlsafe(32)``)."""
        return cls(token=secrets.token_urlsafe(32), author=author, **kwargs)


def static_files() -> dict[str, Path]:
    """The page's files by URL path under ``static/`` (every regular file of the package's static folder)."""
    return {p.relative_to(STATIC_DIR).as_posix(): p for p in sorted(STATIC_DIR.rglob("*"))
            if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts}


def slides_payload(catalogue: Catalogue, *, review_mode: bool = False) -> dict[str, Any]:
    """``data/slides.json``: the slide list, the overlay's colour map (256 RGB entries), the uncertainty
    panel's (viridis over 0..``max`` standard deviation), and whether the page may edit reviews
    (``review_mode``: only a server started with ``--review``; never an export)."""
    from wsi_toolkit.annotations.review import REVIEW_CLASSES, REVIEW_COLORS
    from wsi_toolkit.export.overlay import INFERNO_LUT, UNCERTAINTY_MAX, VIRIDIS_LUT

    return {"slides": catalogue.summary(), "colormap": {"name": "inferno", "lut": INFERNO_LUT.tolist()},
            "uncertainty_colormap": {"name": "viridis", "lut": VIRIDIS_LUT.tolist(), "max": UNCERTAINTY_MAX},
            "review_mode": bool(review_mode),
            "review_classes": [{"name": c, "color": REVIEW_COLORS[c]} for c in REVIEW_CLASSES]}


def js_payload(key: str, payload: Any) -> str:
    """A data file the page loads with a script tag (works from disk, where fetch() does not)."""
    return f"wsiViewData({json.dumps(key)}, {json.dumps(payload, allow_nan=False)});\n"


def create_app(catalogue: Catalogue, *, cache_bytes: int = 256 * 2**20, workers: int | None = None,
               allowed_hosts: list[str] | None = None, review: ReviewSettings | None = None):
    """The FastAPI application serving ``catalogue`` (see the module docstring for its URLs).

    ``allowed_hosts``: ``Host`` names answered (default: loopback names only; ``["*"]`` for any).
    ``review``: review mode (the one write route); None (default): read-only.
    """
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="wsi-view", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts or LOOPBACK_HOSTS))
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="wsi-view-tile")
    cache = TileCache(cache_bytes)
    files = static_files()
    slides_json = slides_payload(catalogue, review_mode=review is not None)
    app.state.catalogue, app.state.cache, app.state.pool = catalogue, cache, pool

    def respond(body: bytes | str, media_type: str, *, cache_control: str = "no-cache", status: int = 200,
                extra: dict[str, str] | None = None) -> Response:
        headers = {**_COMMON, "Cache-Control": cache_control, **(extra or {})}
        return Response(body, status_code=status, media_type=media_type, headers=headers)

    async def view_of(slide_id: str) -> SlideView:
        if slide_id not in catalogue:
            raise HTTPException(404, "no such slide")
        return await run_in_threadpool(catalogue.view, slide_id)

    @app.get("/")
    @app.get("/index.html")
    async def index() -> Response:
        return respond(files["index.html"].read_bytes(), _TYPES[".html"], extra={"Content-Security-Policy": _CSP})

    @app.get("/static/{name:path}")
    async def static(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise HTTPException(404, "no such file")
        return respond(path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"),
                       cache_control="public, max-age=300")

    @app.get("/data/slides.json")
    async def slides() -> Response:
        return respond(json.dumps(slides_json), "application/json")

    @app.get("/data/slides.js")
    async def slides_js() -> Response:
        return respond(js_payload("slides", slides_json), _TYPES[".js"])

    @app.get("/data/{slide_id}/info.json")
    async def info(slide_id: str) -> Response:
        return respond(json.dumps((await view_of(slide_id)).info()), "application/json")

    @app.get("/data/{slide_id}/info.js")
    async def info_js(slide_id: str) -> Response:
        return respond(js_payload(f"info:{slide_id}", (await view_of(slide_id)).info()), _TYPES[".js"])

    @app.get("/data/{slide_id}/slide.dzi")
    async def dzi(slide_id: str) -> Response:
        view = await view_of(slide_id)
        if view.geometry is None:
            raise HTTPException(404, view.error or "no slide")
        return respond(view.geometry.dzi("jpeg"), "application/xml")

    @app.get("/data/{slide_id}/slide_files/{level}/{tile}")
    async def tile(slide_id: str, level: str, tile: str) -> Response:
        m = _TILE.fullmatch(tile)
        if m is None or _LEVEL.fullmatch(level) is None or slide_id not in catalogue:
            raise HTTPException(404, "no such tile")
        view = await view_of(slide_id)
        z, col, row = int(level), int(m.group(1)), int(m.group(2))
        loop = asyncio.get_running_loop()
        try:
            data, hit, error = await loop.run_in_executor(pool, render_tile, cache, view, z, col, row)
        except TileAddressError as exc:
            raise HTTPException(404, str(exc)) from None
        if error is not None:
            return respond(data, "image/jpeg", cache_control="no-store", extra={"X-WSI-Tile-Error": error[:200]})
        return respond(data, "image/jpeg", cache_control="public, max-age=86400, immutable",
                       extra={"X-WSI-Cache": "hit" if hit else "miss"})

    def entry_of(slide_id: str):
        if slide_id not in catalogue:
            raise HTTPException(404, "no such slide")
        return catalogue.entry(slide_id)

    @app.get("/data/{slide_id}/review.json")
    async def review_json(slide_id: str) -> Response:
        payload = await run_in_threadpool(review_payload, entry_of(slide_id))
        return respond(json.dumps(payload), "application/json", cache_control="no-store")

    @app.get("/data/{slide_id}/review.js")
    async def review_js(slide_id: str) -> Response:
        payload = await run_in_threadpool(review_payload, entry_of(slide_id))
        return respond(js_payload(f"review:{slide_id}", payload), _TYPES[".js"], cache_control="no-store")

    @app.get("/data/{slide_id}/queue.json")
    async def queue_json(slide_id: str) -> Response:
        return respond(json.dumps((await view_of(slide_id)).queue()), "application/json")

    @app.get("/data/{slide_id}/queue.js")
    async def queue_js(slide_id: str) -> Response:
        return respond(js_payload(f"queue:{slide_id}", (await view_of(slide_id)).queue()), _TYPES[".js"])

    if review is not None:
        settings = review

        def refuse(status: int, message: str, **extra: Any) -> Response:
            return respond(json.dumps({"detail": message, **extra}), "application/json", status=status,
                           cache_control="no-store")

        async def save(request: Request) -> Response:  # a plain Starlette endpoint: the request as is
            from wsi_toolkit.annotations.review import save_review, validate_review
            from wsi_toolkit.errors import AnnotationError, ReviewConflictError

            slide_id = str(request.path_params["slide_id"])
            token = request.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(token.encode("utf-8", "replace"), settings.token.encode("utf-8")):
                return refuse(403, f"a write needs this server's token in {TOKEN_HEADER} (open the URL wsi-view "
                                   "printed, with its #token=...)")
            origin, host = request.headers.get("origin"), request.headers.get("host", "")
            if origin is not None and origin != f"http://{host}":
                return refuse(403, f"cross-origin write refused (Origin {origin[:100]!r})")
            if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return refuse(403, "cross-site write refused (Sec-Fetch-Site)")
            entry = entry_of(slide_id)
            if not request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
                return refuse(415, "send the review as application/json")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                return refuse(413, f"the review is larger than {settings.max_body_bytes:,} bytes")
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > settings.max_body_bytes:
                    return refuse(413, f"the review is larger than {settings.max_body_bytes:,} bytes")
            if entry.results_dir is None or entry.record is None:
                return refuse(422, f"{entry.name} has no wsi-infer results folder to keep a review in")

            def no_constant(name: str) -> Any:
                raise ValueError(f"{name} is not a JSON number")

            try:
                doc = json.loads(bytes(body).decode("utf-8"), parse_constant=no_constant)
            except (ValueError, RecursionError) as exc:
                return refuse(422, f"the body is not JSON ({str(exc)[:200]})")
            base = doc.get("base_version") if isinstance(doc, dict) else None
            if not isinstance(base, int) or isinstance(base, bool) or base < 0:
                return refuse(422, "the body needs base_version: the version the review was loaded at (0: none)")
            l0_size = tuple(entry.record.slide.level0_size)
            results_dir = entry.results_dir
            try:
                features = await run_in_threadpool(validate_review, doc, l0_size=l0_size, where=f"review of {slide_id}")
                version = await run_in_threadpool(lambda: save_review(results_dir, features, base_version=base,
                                                                      author=settings.author, slide=entry.name))
            except ReviewConflictError as exc:
                return refuse(409, str(exc).replace(str(results_dir), entry.id), current_version=exc.current_version)
            except AnnotationError as exc:
                return refuse(422, str(exc).replace(str(results_dir), entry.id))
            log.info("%s: review version %d saved by %s", entry.id, version, settings.author)
            return respond(json.dumps({"version": version}), "application/json", cache_control="no-store")

        app.add_route("/data/{slide_id}/review", save, methods=["PUT"])

    return app


def render_tile(cache: TileCache, view: SlideView, level: int, col: int, row: int) -> tuple[bytes, bool, str | None]:
    """``(jpeg, cache_hit, error)``: the tile, or an error tile and the reason. Raises
    :class:`TileAddressError` for an address the slide does not have."""
    if view.geometry is None:
        raise TileAddressError("the slide has no tiles")
    box = view.geometry.tile_box(level, col, row)
    tiles = view.tiles
    if tiles is None:
        return error_tile(box[2:], "slide unreadable"), False, view.error or "the slide cannot be read"
    try:
        data, hit = cache.get((view.entry.id, level, col, row), lambda: tiles.render(level, col, row))
    except TileRenderError as exc:
        log.warning("%s", exc)
        return error_tile(box[2:], "tile error"), False, str(exc)
    return data, hit, None


class ViewerServer:
    """A uvicorn server for an app on a socket bound now (``port=0``: a free port), so :attr:`url` is
    known before it runs. :meth:`serve_forever` blocks (the CLI); :meth:`start` / :meth:`stop` run it
    in a thread (tests, benchmarks)."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(128)
        self.host, self.port = host, int(self.sock.getsockname()[1])
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}/"

    def serve_forever(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout_s: float = 30.0) -> ViewerServer:
        self._thread = threading.Thread(target=self.serve_forever, name="wsi-view-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the wsi-view server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sock.close()
        pool = getattr(getattr(self.server.config.app, "state", None), "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
