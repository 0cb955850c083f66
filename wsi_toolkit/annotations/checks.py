"""Checks shared by the annotation readers and writers: file size, coordinates, the slide's extent, repair."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from wsi_toolkit.errors import AnnotationError, ConfigError
from wsi_toolkit.geometry import Polygonal, repair_polygonal
from wsi_toolkit.limits import MAX_COORD_L0

if TYPE_CHECKING:
    from wsi_toolkit.annotations.model import Annotation

__all__ = ["MAX_ANNOTATION_BYTES", "check_on_slide"]

logger = logging.getLogger(__name__)

#: Annotation files larger than this are refused, not parsed (Camelyon16's largest XML is ~5 MiB).
MAX_ANNOTATION_BYTES = 256 * 2**20


def check_readable(path: Path) -> None:
    """Refuse a missing path, a directory, or a file over :data:`MAX_ANNOTATION_BYTES` (AnnotationError)."""
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file not found; check the path")
    if not path.is_file():
        raise AnnotationError(f"{path}: not a file (a directory?); pass the annotation file itself")
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise AnnotationError(
            f"{path}: {size:,} bytes; annotation files of whole slides are a few MiB (at most "
            f"{MAX_ANNOTATION_BYTES // 2**20} MiB are read); is it the right file?")


def check_size(l0_size: Sequence[int], name: str) -> tuple[int, int]:
    """``l0_size`` as positive ints ``(width, height)`` (ConfigError naming ``name`` otherwise)."""
    try:
        l0_w, l0_h = (int(v) for v in l0_size)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be (width, height) in px, got {l0_size!r}") from None
    if l0_w <= 0 or l0_h <= 0:
        raise ConfigError(f"{name} must be positive (width, height) in px, got {l0_size!r}")
    return l0_w, l0_h


def check_coordinates(geom: BaseGeometry, where: str) -> None:
    """Refuse coordinates that are not level-0 pixels of any slide (non-finite, or beyond 2**24)."""
    xy = shapely.get_coordinates(geom)
    if xy.size == 0:
        return
    bad = ~np.isfinite(xy).all(axis=1) | (np.abs(xy) > MAX_COORD_L0).any(axis=1)
    if bad.any():
        x, y = xy[np.flatnonzero(bad)[0]]
        raise AnnotationError(
            f"{where}: vertex ({x:g}, {y:g}) is not a level-0 pixel of any slide (finite, |x|, |y| <= "
            f"{MAX_COORD_L0:,.0f}); the file is damaged or not in level-0 pixels")


def check_on_slide(annotations: Iterable[Annotation], l0_size: Sequence[int], *, where: str = "annotations",
                   tolerance: float = 0.02) -> None:
    """Check annotation outlines against the slide they annotate (level-0 ``(width, height)``).

    Refused (:class:`AnnotationError`): an outline entirely off the slide (wrong slide, or
    coordinates of another pyramid level or unit), and one whose area contains the whole slide
    (every patch would be labelled with its group, e.g. all tumour). Warned: an outline reaching
    more than ``tolerance`` of the slide's size beyond its edge (rasterising clips it).
    """
    w, h = check_size(l0_size, "check_on_slide: l0_size")
    slide_box = shapely.box(0, 0, w, h)
    margin_x, margin_y = tolerance * w, tolerance * h
    for index, ann in enumerate(annotations):
        label = f"{where}: annotation {index} ({ann.name!r}, group {ann.group!r})"
        if ann.polygon.is_empty:
            continue
        x0, y0, x1, y1 = ann.polygon.bounds
        if not ann.polygon.intersects(slide_box) or ann.polygon.intersection(slide_box).area == 0:
            raise AnnotationError(
                f"{label} lies entirely outside the {w:,} x {h:,} px slide (its bounds are x {x0:,.0f}..{x1:,.0f}, "
                f"y {y0:,.0f}..{y1:,.0f}); is it the annotation of another slide, or in another level's pixels?")
        if ann.polygon.covers(slide_box):
            raise AnnotationError(
                f"{label} surrounds the whole {w:,} x {h:,} px slide (bounds x {x0:,.0f}..{x1:,.0f}, "
                f"y {y0:,.0f}..{y1:,.0f}), so every patch would be {ann.group or 'inside it'}; is it in another "
                "level's pixels or of another slide?")
        if x0 < -margin_x or y0 < -margin_y or x1 > w + margin_x or y1 > h + margin_y:
            logger.warning("%s reaches beyond the %d x %d px slide (bounds x %.0f..%.0f, y %.0f..%.0f); the part "
                           "off the slide is ignored", label, w, h, x0, x1, y0, y1)


def repair(geom: BaseGeometry, where: str) -> Polygonal | None:
    """``geom`` as a valid Polygon/MultiPolygon, or None (with a warning) if it has no area."""
    polygonal, reason = repair_polygonal(geom)
    if reason is not None:
        logger.warning("%s: invalid outline (%s); repaired with make_valid", where, reason)
    if polygonal is None:
        logger.warning("%s: outline has no area; skipped", where)
    return polygonal
