"""``wsi-view OUT --export SITE``: the viewer as static files (page + Deep Zoom tiles + data).

The site has the server's URL layout (:mod:`wsi_toolkit.view.server`) as files (the saved reviews and
review queues included, read-only: an export has no write endpoint and no token), so it works from
any static web server and from a folder opened in a browser (the page loads its data with script
tags, not ``fetch``). It is built in a temporary folder next to ``SITE`` (the toolkit's one
temporary-name pattern, :func:`wsi_toolkit.atomic.partial_path`) and renamed into place when
complete; a ``SITE`` written by an earlier export is replaced, any other non-empty folder is refused.
Tiles are rendered by a pool of threads; a tile that cannot be read is written as an error tile and
counted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from wsi_toolkit.atomic import partial_path
from wsi_toolkit.view.catalogue import Catalogue, SlideView, ViewerError, review_payload
from wsi_toolkit.view.server import js_payload, slides_payload, static_files
from wsi_toolkit.view.tiles import TileRenderError, error_tile

__all__ = ["export_site", "ExportReport", "SITE_MARKER"]

log = logging.getLogger(__name__)

#: Written last into an exported site; its presence lets a later export replace the folder.
SITE_MARKER = "wsi-view-site.json"


@dataclass
class ExportReport:
    site: Path
    slides: int = 0
    tiles: int = 0
    error_tiles: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _write(path: Path, data: bytes | str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    path.write_bytes(raw)
    return len(raw)


def _check_target(site: Path) -> None:
    if site.exists() and not site.is_dir():
        raise ViewerError(f"{site} exists and is not a folder; pass a new folder for the site")
    if site.is_dir() and any(site.iterdir()) and not (site / SITE_MARKER).is_file():
        raise ViewerError(f"{site} is a non-empty folder not written by wsi-view --export; pass a new or empty folder")


def export_site(catalogue: Catalogue, site: str | os.PathLike[str], *, workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write the static site of ``catalogue`` to ``site`` (see the module docstring).

    ``progress(done, total)`` is called as tiles are written. Returns what was written.
    """
    site = Path(site)
    _check_target(site)
    site.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = partial_path(site)
    shutil.rmtree(tmp, ignore_errors=True)
    report = ExportReport(site=site)
    try:
        for name, path in static_files().items():
            report.bytes += _write(tmp / ("index.html" if name == "index.html" else f"static/{name}"),
                                   path.read_bytes())
        payload = slides_payload(catalogue)
        report.bytes += _write(tmp / "data" / "slides.json", json.dumps(payload))
        report.bytes += _write(tmp / "data" / "slides.js", js_payload("slides", payload))
        views = []
        for entry in catalogue.entries:
            view = catalogue.view(entry.id)
            info = view.info()
            folder = tmp / "data" / entry.id
            report.bytes += _write(folder / "info.json", json.dumps(info))
            report.bytes += _write(folder / "info.js", js_payload(f"info:{entry.id}", info))
            review, queue = review_payload(entry), view.queue()  # read-only: shown, not editable
            report.bytes += _write(folder / "review.json", json.dumps(review))
            report.bytes += _write(folder / "review.js", js_payload(f"review:{entry.id}", review))
            report.bytes += _write(folder / "queue.json", json.dumps(queue))
            report.bytes += _write(folder / "queue.js", js_payload(f"queue:{entry.id}", queue))
            if view.geometry is not None:
                report.bytes += _write(folder / "slide.dzi", view.geometry.dzi("jpeg"))
                views.append(view)
            if view.error:
                report.errors.append(f"{entry.name}: {view.error}")
            report.slides += 1
        _write_tiles(views, tmp, report, workers=workers, progress=progress)
        _write(tmp / SITE_MARKER, json.dumps({"written_by": "wsi-view --export", "slides": report.slides,
                                               "tiles": report.tiles, "error_tiles": report.error_tiles}))
        _swap_in(tmp, site)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _write_tiles(views: list[SlideView], root: Path, report: ExportReport, *, workers: int | None,
                 progress: Callable[[int, int], None] | None) -> None:
    """Every tile of every view, level by level, each level in rows (the slide's decoded-tile cache
    is sized for that sweep first)."""
    total = sum(v.geometry.tile_count for v in views if v.geometry is not None)
    done = 0

    def one(job: tuple[SlideView, int, int, int, Path]) -> tuple[int, str | None]:
        view, z, c, r, path = job
        assert view.geometry is not None
        error = None
        if view.tiles is None:
            data, error = error_tile(view.geometry.tile_box(z, c, r)[2:], "slide unreadable"), view.error
        else:
            try:
                data = view.tiles.render(z, c, r)
            except TileRenderError as exc:
                data, error = error_tile(view.geometry.tile_box(z, c, r)[2:], "tile error"), str(exc)
        path.write_bytes(data)
        return len(data), error

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2, thread_name_prefix="wsi-view-export") as pool:
        for view in views:
            geo = view.geometry
            assert geo is not None
            base = root / "data" / view.entry.id / "slide_files"
            for z, (cols, rows) in enumerate(geo.level_tiles):
                folder = base / str(z)
                folder.mkdir(parents=True, exist_ok=True)
                if view.tiles is not None:
                    view.tiles.prepare_sweep(z)
                jobs = [(view, z, c, r, folder / f"{c}_{r}.jpeg") for r in range(rows) for c in range(cols)]
                for nbytes, error in pool.map(one, jobs):
                    done += 1
                    report.tiles += 1
                    report.bytes += nbytes
                    if error is not None:
                        report.error_tiles += 1
                        if len(report.errors) < 20:
                            report.errors.append(error)
                    if progress is not None and (done % 500 == 0 or done == total):
                        progress(done, total)


def _swap_in(tmp: Path, site: Path) -> None:
    """Rename the finished site into place; an earlier export there is replaced."""
    if site.exists():
        old = site.with_name(f".{site.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(site, old)
        os.replace(tmp, site)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, site)
