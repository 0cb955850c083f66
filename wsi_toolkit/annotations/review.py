"""A pathologist's review of a slide: ``OUT/<slide>/review.geojson``, read, validated, saved with history.

The file is a QuPath-importable GeoJSON FeatureCollection in level-0 px (x right, y down), so
:func:`~wsi_toolkit.annotations.geojson.read_geojson` reads it too (classification name ->
``Annotation.group``), plus a ``wsi_toolkit`` block saying which version it is::

    {"type": "FeatureCollection",
     "features": [{"type": "Feature", "id": "<uuid4>", "geometry": Polygon | MultiPolygon,
                   "properties": {"objectType": "annotation",
                                  "classification": {"name": "Tumor" | "Normal" | "Exclude", "color": [r, g, b]},
                                  "author": "...", "time": "<ISO-8601 UTC>", "note": "..." (optional)}}, ...],
     "wsi_toolkit": {"kind": "review", "version": N, "slide": "<slide file name>", "saved": "<ISO-8601 UTC>"}}

``version`` is 1 for the first save and +1 per save. Before a save replaces the file, the previous
one is kept as ``review_history/review.v<N>.geojson``. A save names the version it was based on;
when another writer saved first it is refused (:class:`~wsi_toolkit.errors.ReviewConflictError`),
so the second writer reloads, merges and loses nothing. Saves of one results folder are serialised
by a lock file (``.review.lock``, :mod:`filelock`: it holds across processes -- two ``wsi-view``
servers on one results folder, or ``wsi-view --import-review`` while one runs -- and across threads,
where an in-process lock would not), and the file is replaced atomically (:mod:`wsi_toolkit.atomic`).

Public API: :data:`REVIEW_CLASSES`, :class:`ReviewFeature`, :class:`Review`, :func:`read_review`,
:func:`load_review`, :func:`validate_review`, :func:`save_review`, :func:`import_review`,
:func:`review_class`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import shapely
import shapely.geometry

from wsi_toolkit.annotations.asap import read_asap_xml
from wsi_toolkit.annotations.checks import check_size
from wsi_toolkit.annotations.geojson import read_geojson
from wsi_toolkit.annotations.model import EXCLUDE_GROUPS, Polygonal, is_tumor_group
from wsi_toolkit.atomic import write_bytes_atomic, write_text_atomic
from wsi_toolkit.errors import AnnotationError, ReviewConflictError, one_line
from wsi_toolkit.geometry import as_polygonal, polygonal_parts

__all__ = ["REVIEW_CLASSES", "REVIEW_COLORS", "REVIEW_FILE", "REVIEW_HISTORY_DIR", "MAX_REVIEW_FEATURES",
           "MAX_FEATURE_VERTICES", "MAX_REVIEW_VERTICES", "MAX_TEXT_CHARS", "ReviewFeature", "Review",
           "review_class", "read_review", "load_review", "validate_review", "save_review", "import_review",
           "utc_now"]

#: The classes a review feature may have (QuPath classification names).
REVIEW_CLASSES: tuple[str, ...] = ("Tumor", "Normal", "Exclude")
#: Their colours ([r, g, b], as QuPath stores a classification's colour).
REVIEW_COLORS: dict[str, list[int]] = {"Tumor": [200, 0, 0], "Normal": [0, 160, 0], "Exclude": [110, 110, 110]}
REVIEW_FILE = "review.geojson"
REVIEW_HISTORY_DIR = "review_history"
_LOCK_FILE = ".review.lock"
_LOCK_TIMEOUT_S = 30.0

#: Bounds on what a review holds (a pathologist draws tens to hundreds of outlines, not thousands).
MAX_REVIEW_FEATURES = 5000
MAX_FEATURE_VERTICES = 20_000
MAX_REVIEW_VERTICES = 500_000
MAX_TEXT_CHARS = 2000

# Other names of the classes an import accepts (case-insensitive). Camelyon16's exclusion groups
# (_2, "Exclusion") mark non-tumour tissue inside a lesion, i.e. Normal, not an artefact.
_NORMAL_NAMES = frozenset({"normal", "non-tumor", "non-tumour", "nontumor", "benign", "healthy",
                           *(g.casefold() for g in EXCLUDE_GROUPS)})
_EXCLUDE_NAMES = frozenset({"exclude", "excluded", "artefact", "artifact", "fold", "pen", "ignore", "ignore*"})


def utc_now() -> str:
    """The current time as ISO-8601 UTC to the second (``2026-01-31T12:00:00Z``)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def review_class(name: Any) -> str | None:
    """The review class a classification name means (case-insensitive; tumour synonyms as
    :func:`~wsi_toolkit.annotations.is_tumor_group`, Camelyon16's exclusion groups as Normal,
    artefact / fold / pen / ignore as Exclude), or None when it means none of them."""
    if not isinstance(name, str):
        return None
    key = name.strip().casefold()
    for cls in REVIEW_CLASSES:
        if key == cls.casefold():
            return cls
    if is_tumor_group(key):
        return "Tumor"
    if key in _NORMAL_NAMES:
        return "Normal"
    if key in _EXCLUDE_NAMES:
        return "Exclude"
    return None


@dataclass(frozen=True)
class ReviewFeature:
    """One reviewed outline: ``polygon`` in level-0 px, its class (one of :data:`REVIEW_CLASSES`),
    who drew it and when (``""`` until saved: :func:`save_review` stamps them), an optional note."""

    id: str
    polygon: Polygonal
    classification: str
    author: str = ""
    time: str = ""
    note: str = ""

    def content_equals(self, other: ReviewFeature) -> bool:
        """Same outline, class and note (author and time aside)."""
        return (self.classification == other.classification and self.note == other.note
                and shapely.equals_exact(self.polygon, other.polygon, tolerance=0.0))

    def to_geojson(self) -> dict[str, Any]:
        props: dict[str, Any] = {"objectType": "annotation",
                                 "classification": {"name": self.classification,
                                                    "color": list(REVIEW_COLORS[self.classification])},
                                 "author": self.author, "time": self.time}
        if self.note:
            props["note"] = self.note
        return {"type": "Feature", "id": self.id, "geometry": shapely.geometry.mapping(self.polygon),
                "properties": props}


@dataclass(frozen=True)
class Review:
    """A slide's review: its features and version (0: nothing saved yet); ``slide`` and ``saved``
    (ISO-8601 UTC) as the file records them (None before the first save)."""

    features: tuple[ReviewFeature, ...]
    version: int
    slide: str | None = None
    saved: str | None = None

    def to_geojson(self) -> dict[str, Any]:
        return {"type": "FeatureCollection", "features": [f.to_geojson() for f in self.features],
                "wsi_toolkit": {"kind": "review", "version": self.version, "slide": self.slide, "saved": self.saved}}


# ------------------------------------------------------------------------------------------------
# Validation (what a browser submits, what a file holds)
# ------------------------------------------------------------------------------------------------


def _text(value: Any, what: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: {what} is a {type(value).__name__}; it must be a string")
    if len(value) > MAX_TEXT_CHARS:
        raise AnnotationError(f"{where}: {what} has {len(value):,} characters; at most {MAX_TEXT_CHARS:,} are kept")
    return value


def _feature_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: id {value!r} is not a string; give each feature a uuid4 string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise AnnotationError(f"{where}: id {value[:60]!r} is not a UUID; give each feature a uuid4 string") from None


def _rings(poly: Any, where: str) -> list[list[tuple[float, float]]]:
    if not isinstance(poly, list) or not poly:
        raise AnnotationError(f"{where}: a polygon must be a non-empty list of rings")
    rings = []
    for ring in poly:
        if not isinstance(ring, list) or len(ring) < 4:
            raise AnnotationError(f"{where}: a ring needs at least 4 positions (3 corners, closed); got "
                                  f"{len(ring) if isinstance(ring, list) else type(ring).__name__}")
        pts = []
        for p in ring:
            if (not isinstance(p, list) or len(p) < 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p[:2])):
                raise AnnotationError(f"{where}: a position must be [x, y] numbers (level-0 px); got {str(p)[:60]}")
            x, y = float(p[0]), float(p[1])
            if not (math.isfinite(x) and math.isfinite(y)):
                raise AnnotationError(f"{where}: position [{x}, {y}] is not finite")
            pts.append((x, y))
        if pts[0] != pts[-1]:
            raise AnnotationError(f"{where}: a ring must be closed (last position = first)")
        rings.append(pts)
    return rings


def _geometry(geom: Any, where: str) -> Polygonal:
    if not isinstance(geom, Mapping) or geom.get("type") not in ("Polygon", "MultiPolygon"):
        kind = geom.get("type") if isinstance(geom, Mapping) else type(geom).__name__
        raise AnnotationError(f"{where}: geometry is {kind!r}; a review outline is a Polygon or MultiPolygon")
    coords = geom.get("coordinates")
    polys = [coords] if geom["type"] == "Polygon" else coords
    if not isinstance(polys, list) or not polys:
        raise AnnotationError(f"{where}: geometry has no coordinates")
    n_vertices = sum(len(r) for poly in polys if isinstance(poly, list) for r in poly if isinstance(r, list))
    if n_vertices > MAX_FEATURE_VERTICES:
        raise AnnotationError(f"{where}: {n_vertices:,} vertices; an outline may have at most "
                              f"{MAX_FEATURE_VERTICES:,} (simplify it)")
    parts = []
    for poly in polys:
        rings = _rings(poly, where)
        parts.append(shapely.Polygon(rings[0], rings[1:]))
    shape: Polygonal = parts[0] if geom["type"] == "Polygon" else shapely.MultiPolygon(parts)
    return shape


def _check_polygon(shape: Polygonal, where: str, l0_size: tuple[int, int] | None) -> None:
    if not shape.is_empty and not shape.is_valid:
        raise AnnotationError(f"{where}: the outline is not a valid polygon ({shapely.is_valid_reason(shape)}); "
                              "it must not cross itself; draw it again")
    if shape.is_empty or shape.area <= 0:
        raise AnnotationError(f"{where}: the outline has no area (all corners on a line?); draw it again")
    if l0_size is not None:
        w, h = l0_size
        x0, y0, x1, y1 = shape.bounds
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise AnnotationError(f"{where}: the outline (x {x0:,.0f}..{x1:,.0f}, y {y0:,.0f}..{y1:,.0f}) reaches "
                                  f"outside the {w:,} x {h:,} px slide; keep it on the slide")


def _feature(doc: Any, where: str, l0_size: tuple[int, int] | None, *, keep_stamp: bool) -> ReviewFeature:
    if not isinstance(doc, Mapping) or doc.get("type") != "Feature":
        raise AnnotationError(f"{where} is not a GeoJSON Feature")
    props = doc.get("properties") or {}
    if not isinstance(props, Mapping):
        raise AnnotationError(f"{where}: properties must be an object")
    raw = props.get("classification")
    name = raw.get("name") if isinstance(raw, Mapping) else raw
    cls = name if name in REVIEW_CLASSES else None
    if cls is None:
        shown = str(name)[:60] if name is not None else "(none)"
        raise AnnotationError(f"{where}: class {shown!r} is not one of {', '.join(REVIEW_CLASSES)}")
    shape = _geometry(doc.get("geometry"), where)
    _check_polygon(shape, where, l0_size)
    return ReviewFeature(id=_feature_id(doc.get("id"), where), polygon=shape, classification=cls,
                         author=_text(props.get("author"), "author", where) if keep_stamp else "",
                         time=_text(props.get("time"), "time", where) if keep_stamp else "",
                         note=_text(props.get("note"), "note", where))


def validate_review(doc: Any, *, l0_size: Sequence[int] | None, where: str = "review",
                    keep_stamps: bool = False) -> tuple[ReviewFeature, ...]:
    """The features of a submitted review (a GeoJSON FeatureCollection as the page sends it), checked.

    Refused (:class:`~wsi_toolkit.errors.AnnotationError`, the message names the feature and the
    fix): not a FeatureCollection; more than :data:`MAX_REVIEW_FEATURES` features or
    :data:`MAX_REVIEW_VERTICES` vertices (:data:`MAX_FEATURE_VERTICES` in one); a class that is not
    one of :data:`REVIEW_CLASSES` (exactly); a geometry that is not a Polygon/MultiPolygon of closed
    rings of finite [x, y]; an empty, zero-area or self-crossing outline; with ``l0_size`` (the
    slide's level-0 ``(width, height)``), an outline reaching outside the slide; an id that is not a
    UUID or is repeated; an author, time or note over :data:`MAX_TEXT_CHARS` characters.

    ``keep_stamps``: keep the features' ``author`` and ``time`` (reading a saved file); by default
    they are dropped, so that :func:`save_review`, not the submitter, says who saved what and when.
    """
    size = check_size(l0_size, "l0_size") if l0_size is not None else None
    if not isinstance(doc, Mapping) or doc.get("type") != "FeatureCollection" or not isinstance(
            doc.get("features"), list):
        raise AnnotationError(f"{where}: not a GeoJSON FeatureCollection with a list of features")
    raw = doc["features"]
    if len(raw) > MAX_REVIEW_FEATURES:
        raise AnnotationError(f"{where}: {len(raw):,} features; a review may hold at most {MAX_REVIEW_FEATURES:,}")
    features, seen, total = [], set(), 0
    for index, item in enumerate(raw):
        feat = _feature(item, f"{where}: feature {index}", size, keep_stamp=keep_stamps)
        if feat.id in seen:
            raise AnnotationError(f"{where}: feature {index}: id {feat.id} is used twice; ids must be unique")
        seen.add(feat.id)
        total += len(shapely.get_coordinates(feat.polygon))
        if total > MAX_REVIEW_VERTICES:
            raise AnnotationError(f"{where}: more than {MAX_REVIEW_VERTICES:,} vertices in all; simplify the outlines")
        features.append(feat)
    return tuple(features)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def read_review(path: str | os.PathLike[str]) -> Review:
    """A ``review.geojson`` written by :func:`save_review` (features checked as :func:`validate_review`
    does, without the slide's bounds). AnnotationError when it is missing, not JSON or not a review."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such review file") from None
    except (OSError, ValueError) as exc:
        raise AnnotationError(f"{path}: not readable JSON ({one_line(exc)}); restore it from "
                              f"{REVIEW_HISTORY_DIR}/ or delete it") from None
    meta = doc.get("wsi_toolkit") if isinstance(doc, Mapping) else None
    version = meta.get("version") if isinstance(meta, Mapping) else None
    if not isinstance(meta, Mapping) or meta.get("kind") != "review" or not isinstance(version, int) or version < 1:
        raise AnnotationError(f"{path}: not a wsi-view review (no wsi_toolkit.kind 'review' with a version >= 1); "
                              "import a QuPath or ASAP file with wsi-view --import-review instead")
    features = validate_review(doc, l0_size=None, where=str(path), keep_stamps=True)
    slide, saved = meta.get("slide"), meta.get("saved")
    return Review(features=features, version=version, slide=slide if isinstance(slide, str) else None,
                  saved=saved if isinstance(saved, str) else None)


def load_review(results_dir: str | os.PathLike[str]) -> Review:
    """The review of a results folder (``results_dir/review.geojson``); version 0 and no features
    when nothing has been saved yet."""
    path = Path(results_dir) / REVIEW_FILE
    _refuse_links(Path(results_dir))
    if not path.exists():
        return Review(features=(), version=0)
    return read_review(path)


def _refuse_links(results_dir: Path) -> None:
    """Nothing is read or written through a link: a review file or history folder that is a symbolic
    link (it could point out of the results folder) is refused."""
    for name in (REVIEW_FILE, REVIEW_HISTORY_DIR):
        if (results_dir / name).is_symlink():
            raise AnnotationError(f"{results_dir / name} is a symbolic link; a review is kept only in the results "
                                  "folder itself: replace the link by the file or folder")


def _stamp(features: Iterable[ReviewFeature], current: Review, author: str, now: str) -> tuple[ReviewFeature, ...]:
    stored = {f.id: f for f in current.features}
    out = []
    for f in features:
        old = stored.get(f.id)
        if old is not None and f.content_equals(old):
            out.append(replace(f, author=old.author, time=old.time))
        elif f.author and f.time and old is None:
            out.append(f)  # an import keeps the author and time the file carries
        else:
            out.append(replace(f, author=author, time=now))
    return tuple(out)


def save_review(results_dir: str | os.PathLike[str], features: Iterable[ReviewFeature], *, base_version: int,
                author: str, slide: str | None = None) -> int:
    """Save ``features`` as the next version of ``results_dir/review.geojson``; returns that version.

    ``base_version``: the version the features were edited from (0: none saved yet). When it is
    not the current version, nothing is written and :class:`~wsi_toolkit.errors.ReviewConflictError`
    says which is current. Features unchanged since the stored version (same id, outline, class,
    note) keep their author and time; the others get ``author`` and now. The previous file is kept
    as ``review_history/review.v<N>.geojson``. ``slide``: the slide's file name (default: as the
    current file records it, else the results folder's name).
    """
    from filelock import FileLock, Timeout

    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise AnnotationError(f"{results_dir} is not a results folder; pass OUT/<slide>/ of a wsi-infer run")
    author = _text(author, "author", "save_review") or "unknown"
    features = list(features)
    if len(features) > MAX_REVIEW_FEATURES:
        raise AnnotationError(f"{len(features):,} features; a review may hold at most {MAX_REVIEW_FEATURES:,}")
    try:
        with FileLock(str(results_dir / _LOCK_FILE), timeout=_LOCK_TIMEOUT_S):
            current = load_review(results_dir)
            if base_version != current.version:
                raise ReviewConflictError(
                    f"{results_dir / REVIEW_FILE}: version {current.version} was saved since version "
                    f"{base_version} was loaded; reload it, merge your changes and save again",
                    current_version=current.version, base_version=base_version)
            now = utc_now()
            new = Review(features=_stamp(features, current, author, now), version=current.version + 1,
                         slide=slide if slide is not None else current.slide or results_dir.name, saved=now)
            text = json.dumps(new.to_geojson(), indent=1, ensure_ascii=False, allow_nan=False)
            path = results_dir / REVIEW_FILE
            if current.version > 0:
                history = results_dir / REVIEW_HISTORY_DIR
                history.mkdir(exist_ok=True)
                write_bytes_atomic(history / f"review.v{current.version}.geojson", path.read_bytes())
            write_text_atomic(path, text + "\n")
    except Timeout:
        raise ReviewConflictError(f"{results_dir / _LOCK_FILE}: another save has held the lock for "
                                  f"{_LOCK_TIMEOUT_S:g} s; try again", current_version=-1,
                                  base_version=base_version) from None
    return new.version


def import_review(results_dir: str | os.PathLike[str], exported: str | os.PathLike[str], *,
                  l0_size: Sequence[int], author: str, slide: str | None = None) -> int:
    """Save a QuPath-edited GeoJSON or an ASAP XML (``.xml``) of the same slide as the next review
    version of ``results_dir`` (replacing the current features; the previous file kept in history).
    Returns the new version.

    Classes map case-insensitively (:func:`review_class`); a file with any other class (or none) is
    refused with an AnnotationError naming them. Outlines are checked against the slide
    (``l0_size``, level-0 ``(width, height)``: one entirely off it is refused) and clipped to it.
    Features keep the ``author`` and ``time`` properties they carry; others get ``author`` and now.
    """
    exported = Path(exported)
    size = check_size(l0_size, "l0_size")
    reader = read_asap_xml if exported.suffix.lower() == ".xml" else read_geojson
    annotations = reader(exported, l0_size=size)
    unknown = sorted({a.group or "(no class)" for a in annotations if review_class(a.group) is None})
    if unknown:
        raise AnnotationError(f"{exported}: class(es) {', '.join(repr(u) for u in unknown)} are not review classes; "
                              f"rename them to {', '.join(REVIEW_CLASSES)} (artefact, fold, pen: Exclude) and "
                              "import again")
    box = shapely.box(0, 0, *size)
    features = []
    for index, ann in enumerate(annotations):
        shape = as_polygonal([p for p in polygonal_parts(ann.polygon.intersection(box)) if p.area > 0])
        if shape.is_empty:
            continue
        where = f"{exported}: annotation {index}"
        props = ann.properties
        stamp = (_text(props.get("author"), "author", where), _text(props.get("time"), "time", where))
        features.append(ReviewFeature(id=str(uuid.uuid4()), polygon=shape, classification=str(review_class(ann.group)),
                                      author=stamp[0] if all(stamp) else "", time=stamp[1] if all(stamp) else "",
                                      note=_text(props.get("note") or ann.name or None, "note", where)))
        _check_polygon(shape, where, size)
    current = load_review(results_dir)
    return save_review(results_dir, features, base_version=current.version, author=author, slide=slide)
