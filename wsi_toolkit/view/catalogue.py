"""What ``wsi-view`` shows: the slides of a results folder (or one slide), each with its heatmap and regions.

A :class:`Catalogue` is fixed when the viewer starts: its entries, keyed by an id (the slide's
results folder name), are the only things the server or an export can reach. Every file read comes
from a path built here (``run.json``, ``heatmap.tif``, ``tumor.geojson`` in the entry's results
folder, the slide named by its ``run.json``), never from a URL; results files that are symbolic
links out of the results folder are refused.

Opening a slide is lazy (first request) and its failure is kept as a message: an unreadable slide
still shows its heatmap and regions, with the error in the page, and the other slides are served.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from wsi_toolkit.errors import ConfigError, WsiToolkitError, one_line
from wsi_toolkit.heatmap import MERGE_MODES, Heatmap, MergeMode, paint_cells
from wsi_toolkit.records import RunRecord, RunRecordError
from wsi_toolkit.view.tiles import DeepZoomGeometry, OpenSlideTiles, ReaderTiles, TileSource

__all__ = ["Catalogue", "SlideEntry", "SlideView", "inside", "ViewerError", "review_payload"]

log = logging.getLogger(__name__)

#: Largest tumor.geojson read (bytes): wsi-infer writes a few kB per region.
MAX_GEOJSON_BYTES = 64 * 2**20


class ViewerError(WsiToolkitError, ValueError):
    """A results folder or slide the viewer cannot be started on."""


def inside(path: Path, root: Path) -> bool:
    """True when ``path`` (symbolic links followed) is a regular file or folder inside ``root``."""
    try:
        real, base = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return real == base or base in real.parents


def _results_file(results_dir: Path, name: str) -> Path:
    """``results_dir / name`` if it is a regular file inside the results folder, else ViewerError."""
    path = results_dir / name
    if not path.exists():
        raise ViewerError(f"{path} does not exist")
    if not inside(path, results_dir) or not path.is_file():
        raise ViewerError(f"{path} is not a file inside {results_dir} (a link out of the results folder is not served)")
    return path


def _float(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class SlideEntry:
    """One slide of the catalogue. ``error`` says why it has nothing to show (a failed run)."""

    id: str
    name: str
    slide_path: Path | None = None
    results_dir: Path | None = None
    record: RunRecord | None = None
    mpp_override: float | None = None
    backend: str = "auto"
    status: str = "ok"
    error: str | None = None
    slide_score: float | None = None
    tumor_area_mm2: float | None = None

    @property
    def synthetic(self) -> bool:
        rec = self.record
        return bool(rec and (rec.synthetic or rec.slide.synthetic or rec.model.synthetic))

    def summary(self) -> dict[str, Any]:
        """The slide-list row."""
        rec = self.record
        return {"id": self.id, "name": self.name, "status": self.status, "error": self.error,
                "slide_score": self.slide_score, "tumor_area_mm2": self.tumor_area_mm2,
                "n_regions": rec.counts.n_regions if rec else None, "synthetic": self.synthetic}


@dataclass
class SlideView:
    """An entry opened: tiles (None with ``error`` when the slide cannot be read), heatmap, regions and,
    for a ``wsi-infer --tta`` run, the uncertainty map (``uncertainty.tif``, on the heatmap's predicted cells)."""

    entry: SlideEntry
    tiles: TileSource | None
    geometry: DeepZoomGeometry | None
    slide_meta: dict[str, Any]
    error: str | None = None
    heatmap: Heatmap | None = None
    heatmap_error: str | None = None
    regions: list[dict[str, Any]] | None = None
    regions_error: str | None = None
    uncertainty: Heatmap | None = None
    uncertainty_error: str | None = None
    _info: dict[str, Any] | None = field(default=None, repr=False)
    _queue: dict[str, Any] | None = field(default=None, repr=False)

    def queue(self) -> dict[str, Any]:
        """The review queue (:func:`wsi_toolkit.view.queue.review_queue`) as the page reads it:
        ``items`` (best first; each ``bbox_l0``, ``score``, ``reason``, measurements), ``rule`` and
        ``error`` (why there is none: no heatmap)."""
        if self._queue is None:
            from wsi_toolkit.view.queue import review_queue

            if self.heatmap is None:
                self._queue = {"items": [], "rule": None, "error": self.heatmap_error or "no heatmap"}
            else:
                threshold = self.info()["threshold"]
                items = review_queue(self.heatmap, threshold=0.5 if threshold is None else threshold,
                                     uncertainty=self.uncertainty)
                self._queue = {"items": [it.to_json() for it in items],
                               "rule": items[0].rule if items else None, "error": None}
        return self._queue

    def info(self) -> dict[str, Any]:
        """Everything the page needs about this slide (JSON-ready); the heatmap as a PNG data URL."""
        if self._info is None:
            e, rec = self.entry, self.entry.record
            hm = None
            if self.heatmap is not None:
                hm = {"shape_rc": list(self.heatmap.shape_rc), "cell_l0": self.heatmap.cell_l0,
                      "mpp": self.heatmap.mpp, "png": heatmap_png_data_url(self.heatmap)}
            unc = None
            if self.uncertainty is not None:
                unc = {"shape_rc": list(self.uncertainty.shape_rc), "cell_l0": self.uncertainty.cell_l0,
                       "mpp": self.uncertainty.mpp, "png": heatmap_png_data_url(self.uncertainty)}
            threshold = None
            if rec is not None:
                threshold = _float((rec.settings.get("run") or {}).get("threshold"))
            self._info = {
                "id": e.id, "name": e.name, "synthetic": e.synthetic,
                "synthetic_parts": [k for k, v in (("slide", rec and rec.slide.synthetic),
                                                   ("model", rec and rec.model.synthetic)) if v],
                "slide": {**self.slide_meta, **(self.geometry.to_json() if self.geometry else {}),
                          "format": self.tiles.fmt if self.tiles else "jpeg"},
                "error": self.error, "status": e.status,
                "slide_score": e.slide_score, "tumor_area_mm2": e.tumor_area_mm2, "threshold": threshold,
                "heatmap": hm, "heatmap_error": self.heatmap_error,
                "uncertainty": unc, "uncertainty_error": self.uncertainty_error,
                "regions": self.regions, "regions_error": self.regions_error,
            }
        return self._info

    def close(self) -> None:
        if self.tiles is not None:
            self.tiles.close()


def review_payload(entry: SlideEntry) -> dict[str, Any]:
    """The slide's saved review (``review.geojson``, :mod:`wsi_toolkit.annotations.review`) as the page
    reads it: the FeatureCollection with its ``wsi_toolkit`` block (version 0 and no features when none
    is saved), and ``error`` when the file cannot be read."""
    from wsi_toolkit.annotations.review import Review, load_review

    if entry.results_dir is None:
        return {**Review(features=(), version=0).to_geojson(), "error": None}
    try:
        return {**load_review(entry.results_dir).to_geojson(), "error": None}
    except (WsiToolkitError, OSError) as exc:
        return {**Review(features=(), version=0).to_geojson(), "error": one_line(exc)}


def heatmap_png_data_url(heatmap: Heatmap) -> str:
    """The heatmap as a ``data:image/png`` URL, one pixel per cell, mode LA: L = round(prob * 255)
    (as heatmap.tif stores it), A = 255 where predicted, 0 elsewhere. The uncertainty map the same way:
    L = round(std * 255), as uncertainty.tif stores it."""
    grey = np.rint(np.clip(heatmap.prob.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    alpha = np.where(heatmap.predicted, 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_regions(path: Path) -> list[dict[str, Any]]:
    """tumor.geojson as the page's region list, sorted by max probability (highest first).

    Each: ``index`` (1-based, file order), ``name``, ``polygons`` (list of polygons, each a list of
    rings of [x, y] level-0 px, exterior first), ``bbox_l0`` [x0, y0, x1, y1], and the measurements
    ``area_mm2``, ``longest_diameter_um``, ``max_prob``, ``mean_prob``.
    """
    if path.stat().st_size > MAX_GEOJSON_BYTES:
        raise ViewerError(f"{path} is larger than {MAX_GEOJSON_BYTES // 2**20} MiB; not a wsi-infer tumor.geojson")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ViewerError(f"{path}: not readable GeoJSON ({one_line(exc)})") from None
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list):
        raise ViewerError(f"{path}: not a GeoJSON FeatureCollection")
    out: list[dict[str, Any]] = []
    for index, feat in enumerate(features, start=1):
        geom = (feat or {}).get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates")
        polygons = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else None
        if not isinstance(polygons, list):
            raise ViewerError(f"{path}: feature {index} is a {kind!r}, not a Polygon or MultiPolygon")
        try:
            polys = [[[[float(x), float(y)] for x, y, *_ in ring] for ring in poly] for poly in polygons]
        except (TypeError, ValueError):
            raise ViewerError(f"{path}: feature {index} has malformed coordinates") from None
        xy = np.array([p for poly in polys for ring in poly for p in ring] or [[0.0, 0.0]])
        props = feat.get("properties") or {}
        meas = props.get("measurements") or {}
        out.append({
            "index": index, "name": str(props.get("name") or f"Tumour region {index}"), "polygons": polys,
            "bbox_l0": [float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max())],
            "area_mm2": _float(meas.get("area_mm2")), "longest_diameter_um": _float(meas.get("longest_diameter_um")),
            "max_prob": _float(meas.get("max_probability")), "mean_prob": _float(meas.get("mean_probability")),
        })
    out.sort(key=lambda r: (-(r["max_prob"] if r["max_prob"] is not None else -1.0), r["index"]))
    return out


class Catalogue:
    """The slides a viewer was started with, sorted by slide score (highest first; failed last)."""

    def __init__(self, entries: list[SlideEntry], *, root: Path | None = None):
        ids = [e.id for e in entries]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"slide ids must be unique; got {ids}")
        self.root = root
        self.entries = sorted(entries, key=lambda e: (e.slide_score is None, -(e.slide_score or 0.0), e.name))
        self._by_id = {e.id: e for e in self.entries}
        self._views: dict[str, SlideView] = {}
        self._locks = {e.id: threading.Lock() for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._by_id

    def entry(self, slide_id: str) -> SlideEntry:
        """The entry of ``slide_id``; KeyError when it is not one of the catalogue's."""
        return self._by_id[slide_id]

    def summary(self) -> list[dict[str, Any]]:
        return [e.summary() for e in self.entries]

    def view(self, slide_id: str) -> SlideView:
        """The opened slide (opened once, on first use)."""
        entry = self._by_id[slide_id]
        with self._locks[slide_id]:
            view = self._views.get(slide_id)
            if view is None:
                view = self._views[slide_id] = open_view(entry)
            return view

    def close(self) -> None:
        for view in self._views.values():
            view.close()
        self._views.clear()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_results(cls, out: str | Path, *, slides_dir: str | Path | None = None) -> Catalogue:
        """Every slide of a ``wsi-infer`` results folder: the rows of ``OUT/summary.csv`` (failed ones
        listed with their error), or, without a summary, every sub-folder holding a ``run.json``."""
        out = Path(out)
        if not out.is_dir():
            raise ViewerError(f"{out} is not a folder; pass a wsi-infer results folder (it holds summary.csv)")
        folders: dict[str, tuple[Path, RunRecord | None, str | None]] = {}
        for sub in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if not (sub / "run.json").exists():
                continue
            if not inside(sub, out):
                log.warning("%s: a link out of %s; not served", sub, out)
                continue
            try:
                folders[sub.name] = (sub, RunRecord.read(_results_file(sub, "run.json")), None)
            except (RunRecordError, ViewerError) as exc:
                folders[sub.name] = (sub, None, str(exc))
        from wsi_toolkit.export import csv_untext  # summary.csv's cells as the batch wrote them

        entries: list[SlideEntry] = []
        summary = out / "summary.csv"
        if summary.is_file() and inside(summary, out):
            by_path = {str(rec.slide.path): name for name, (_, rec, _) in folders.items() if rec is not None}
            with summary.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            used: set[str] = set()
            for i, row in enumerate(rows):
                slide = csv_untext(row.get("slide") or "")
                status = row.get("status") or ""
                name = by_path.get(slide)
                if status in ("ok", "skipped") and name is not None and name not in used:
                    used.add(name)
                    entries.append(_entry(name, *folders[name], slides_dir=slides_dir))
                else:
                    error = csv_untext(row.get("error") or "") or (
                        f"no results folder in {out} holds a run.json of this slide" if status in ("ok", "skipped")
                        else f"status {status or 'unknown'}")
                    entries.append(SlideEntry(id=f"row{i + 1}", name=Path(slide).name or f"row {i + 1}",
                                              status=status or "unknown", error=error,
                                              slide_score=None, tumor_area_mm2=None))
        else:
            entries = [_entry(name, *item, slides_dir=slides_dir) for name, item in folders.items()]
        if not entries:
            raise ViewerError(f"{out} holds no wsi-infer results (no summary.csv rows, no <slide>/run.json); run "
                              "wsi-infer SLIDES --out " + str(out))
        return cls(entries, root=out)

    @classmethod
    def from_slide(cls, slide: str | Path, results_dir: str | Path | None = None, *,
                   mpp: float | None = None) -> Catalogue:
        """One slide, with the results folder ``wsi-infer`` wrote for it (or none: the slide alone)."""
        slide = Path(slide)
        if results_dir is None:
            entry = SlideEntry(id=_slide_id(slide.stem), name=slide.name, slide_path=slide, mpp_override=mpp)
            return cls([entry], root=None)
        results_dir = Path(results_dir)
        if not (results_dir / "run.json").exists():
            raise ViewerError(f"{results_dir} holds no run.json; pass the slide's own folder of a wsi-infer "
                              "results folder (OUT/<slide>/)")
        record = RunRecord.read(_results_file(results_dir, "run.json"))
        entry = _entry(_slide_id(results_dir.name), results_dir, record, None, slide_path=slide)
        if mpp is not None:
            entry.mpp_override = mpp
        return cls([entry], root=results_dir)


def _slide_id(name: str) -> str:
    return name.strip() or "slide"


def _entry(name: str, results_dir: Path, record: RunRecord | None, error: str | None, *,
           slides_dir: str | Path | None = None, slide_path: Path | None = None) -> SlideEntry:
    if record is None:
        return SlideEntry(id=name, name=name, results_dir=results_dir, status="failed", error=error)
    if slide_path is None:
        slide_path = Path(record.slide.path)
        if not slide_path.exists() and slides_dir is not None and (Path(slides_dir) / slide_path.name).exists():
            slide_path = Path(slides_dir) / slide_path.name
    return SlideEntry(id=name, name=slide_path.name, slide_path=slide_path, results_dir=results_dir,
                      record=record, mpp_override=record.slide.mpp if record.slide.mpp_source == "override" else None,
                      backend=record.slide.backend, status=record.status, slide_score=_float(record.slide_score),
                      tumor_area_mm2=_float(record.tumor_area_mm2))


def read_results_heatmap(results_dir: Path, record: RunRecord) -> Heatmap:
    """The heatmap of a results folder: ``heatmap.tif``, whose cells read as not predicted where their
    probability rounds to 0 / 255, with the predicted cells restored from ``tiles.csv`` (one row per
    predicted patch: its cell, or with the mean merge the cells its footprint paints). Without a
    usable ``tiles.csv`` the non-zero cells are the predicted ones."""
    from wsi_toolkit.export import read_heatmap_tiff

    heat = read_heatmap_tiff(_results_file(results_dir, "heatmap.tif"))
    try:
        predicted = _predicted_from_tiles(_results_file(results_dir, "tiles.csv"), record, heat.shape_rc)
    except (ViewerError, OSError, ValueError) as exc:
        log.info("%s: predicted cells from heatmap.tif only (%s)", results_dir, one_line(exc))
        return heat
    if (heat.predicted & ~predicted).any():
        log.warning("%s: tiles.csv does not cover heatmap.tif's cells; predicted cells from heatmap.tif only",
                    results_dir)
        return heat
    return Heatmap(prob=heat.prob, predicted=predicted, cell_l0=heat.cell_l0, l0_mpp=heat.l0_mpp, merge=heat.merge)


def read_results_uncertainty(results_dir: Path, heatmap: Heatmap) -> Heatmap:
    """``uncertainty.tif`` of a results folder (``wsi-infer --tta``), on ``heatmap``'s predicted cells
    (its zeros are as ambiguous as heatmap.tif's; the two were stitched from the same patches)."""
    from wsi_toolkit.export import UNCERTAINTY_TIFF_CONTENT, read_heatmap_tiff

    unc = read_heatmap_tiff(_results_file(results_dir, "uncertainty.tif"), content=UNCERTAINTY_TIFF_CONTENT)
    if unc.shape_rc != heatmap.shape_rc or unc.cell_l0 != heatmap.cell_l0:
        raise ViewerError(f"{results_dir}: uncertainty.tif ({unc.shape_rc}, cell {unc.cell_l0}) does not match "
                          f"heatmap.tif ({heatmap.shape_rc}, cell {heatmap.cell_l0})")
    return Heatmap(prob=unc.prob, predicted=heatmap.predicted, cell_l0=unc.cell_l0, l0_mpp=unc.l0_mpp,
                   merge=unc.merge)


def _predicted_from_tiles(path: Path, record: RunRecord, shape_rc: tuple[int, int]) -> np.ndarray:
    grid = record.grid
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().strip().split(",")
        if header[:2] != ["minx", "miny"]:
            raise ViewerError(f"{path}: not a wsi-infer tiles.csv")
        xy = np.loadtxt(fh, delimiter=",", usecols=(0, 1), ndmin=2) if path.stat().st_size > 0 else np.zeros((0, 2))
    cells_xy = np.rint((xy + grid.offset_l0) / grid.cell_l0).astype(np.int64)  # (col, row) of each patch's cell
    if [int(v) for v in grid.shape_rc] != list(shape_rc):
        raise ViewerError(f"{path}: run.json's grid is {grid.shape_rc}, heatmap.tif {shape_rc}")
    merge = record.heatmap.get("merge") or "centre"
    run_grid = record.settings.get("grid") or {}
    if merge not in MERGE_MODES or (merge != "centre" and not {"patch_px", "stride_px"} <= run_grid.keys()):
        raise ViewerError(f"{path}: run.json does not say how the heatmap was painted (merge {merge!r}, grid "
                          f"{run_grid})")
    _, count = paint_cells(cells_xy[:, ::-1], np.zeros(len(cells_xy)), shape_rc, merge=cast(MergeMode, merge),
                           patch_px=int(run_grid.get("patch_px", 1)), stride_px=int(run_grid.get("stride_px", 1)))
    return count > 0


def open_tiles(path: Path, *, mpp: float | None = None, backend: str = "auto") -> tuple[TileSource, dict[str, Any]]:
    """Tiles of a slide: ``DeepZoomGenerator`` where the toolkit reads it with OpenSlide (``backend``:
    the one its results were made with, as ``open_slide`` takes it), else our reader; plus the
    slide's metadata for the page."""
    from wsi_toolkit.slide import open_slide

    reader = open_slide(path, mpp=mpp, backend="openslide" if backend == "openslide" else
                        "tifffile" if backend == "tifffile" else "auto")
    st = Path(path).stat()
    version = hashlib.sha1(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    meta = {"version": version, "width": reader.dimensions[0], "height": reader.dimensions[1], "mpp": reader.mpp,
            "mpp_source": reader.mpp_source, "backend": reader.backend, "vendor": reader.vendor,
            "synthetic": reader.is_synthetic}
    if reader.backend == "openslide":
        reader.close()
        return OpenSlideTiles(path), meta
    return ReaderTiles(reader), meta


def open_view(entry: SlideEntry) -> SlideView:
    """Open an entry's slide, heatmap and regions; each failure is kept as that part's message."""
    rec = entry.record
    tiles = geometry = None
    meta: dict[str, Any] = {}
    error = entry.error
    if rec is not None:
        meta = {"width": rec.slide.level0_size[0], "height": rec.slide.level0_size[1], "mpp": rec.slide.mpp,
                "mpp_source": rec.slide.mpp_source, "backend": rec.slide.backend, "vendor": rec.slide.vendor}
    if entry.slide_path is not None and error is None:
        try:
            tiles, slide_meta = open_tiles(entry.slide_path, mpp=entry.mpp_override, backend=entry.backend)
        except (WsiToolkitError, OSError, ValueError) as exc:
            error = f"the slide cannot be read: {one_line(exc)}"
            log.warning("%s: %s", entry.slide_path, error)
        else:
            size = [tiles.geometry.width, tiles.geometry.height]
            if rec is not None and size != list(rec.slide.level0_size):
                error = (f"{entry.slide_path} is {size[0]} x {size[1]} px but the results were made from a "
                         f"{rec.slide.level0_size[0]} x {rec.slide.level0_size[1]} px slide; pass the slide they "
                         "were made from")
                tiles.close()
                tiles = None
            else:
                meta, geometry = slide_meta, tiles.geometry
    if geometry is None and meta.get("width"):
        geometry = DeepZoomGeometry(int(meta["width"]), int(meta["height"]))  # error tiles where the slide is
    view = SlideView(entry=entry, tiles=tiles, geometry=geometry, slide_meta=meta, error=error)
    if entry.results_dir is not None and rec is not None:
        try:
            view.heatmap = read_results_heatmap(entry.results_dir, rec)
        except (WsiToolkitError, OSError) as exc:
            view.heatmap_error = one_line(exc)
        try:
            view.regions = read_regions(_results_file(entry.results_dir, "tumor.geojson"))
        except (WsiToolkitError, OSError) as exc:
            view.regions_error = one_line(exc)
        if "uncertainty.tif" in rec.outputs and view.heatmap is not None:
            try:
                view.uncertainty = read_results_uncertainty(entry.results_dir, view.heatmap)
            except (WsiToolkitError, OSError) as exc:
                view.uncertainty_error = one_line(exc)
    return view
