"""Polygon helpers shared by tissue detection, annotations and the exporters.

Frames: polygons are ``(x, y)``; masks are indexed ``[row, col]`` and mask pixel ``[r, c]`` is the
square ``[c, c+1] x [r, r+1]`` before scaling, so ``scale`` (e.g. level-0 px per mask px) maps a
mask outline to level-0 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import shapely
import shapely.affinity
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from skimage import measure

from wsi_toolkit.limits import check_number

__all__ = ["Polygonal", "polygonal_parts", "as_polygonal", "repair_polygonal", "mask_to_polygons", "scale_xy"]

#: An areal geometry: a Polygon or a MultiPolygon (holes allowed).
Polygonal: TypeAlias = shapely.Polygon | shapely.MultiPolygon


def polygonal_parts(geom: BaseGeometry | None) -> list[Polygon]:
    """The non-empty Polygons of ``geom``, multi-parts and collections flattened, lines and points dropped."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if isinstance(geom, (MultiPolygon, shapely.GeometryCollection)):
        return [p for part in geom.geoms for p in polygonal_parts(part)]
    return []


def as_polygonal(polys: Sequence[Polygon]) -> Polygonal:
    """An empty Polygon, the one Polygon, or a MultiPolygon of ``polys``."""
    if not polys:
        return Polygon()
    if len(polys) == 1:
        return polys[0]
    return MultiPolygon(list(polys))


def repair_polygonal(geom: BaseGeometry) -> tuple[Polygonal | None, str | None]:
    """``geom`` as a valid Polygon/MultiPolygon with only parts of positive area.

    Returns ``(polygonal, reason)``: ``reason`` is why ``geom`` was invalid (it was then repaired
    with :func:`shapely.make_valid`), None when it was valid; ``polygonal`` is None when nothing
    with an area is left. A valid Polygon/MultiPolygon whose parts all have an area is returned as is.
    """
    reason = None
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        geom = shapely.make_valid(geom)
    all_parts = polygonal_parts(geom)
    parts = [p for p in all_parts if p.area > 0]
    if not parts:
        return None, reason
    if isinstance(geom, (Polygon, MultiPolygon)) and len(parts) == len(all_parts):
        return geom, reason
    return as_polygonal(parts), reason


def scale_xy(geom: BaseGeometry, factor: float) -> BaseGeometry:
    """``geom`` with x and y multiplied by ``factor`` about the origin (e.g. micrometres -> level-0 px)."""
    return shapely.affinity.scale(geom, factor, factor, origin=(0, 0))


def _square_ring(contour_rc: np.ndarray) -> np.ndarray:
    """Midpoint contour of a padded bool mask -> ring along pixel edges, (row, col), open.

    ``find_contours(level=0.5)`` on a 0/1 image puts every vertex at the midpoint of a
    pixel edge and cuts each corner diagonally. A diagonal step always crosses one
    marching-squares cell, whose centre is the pixel corner being cut; inserting it makes
    the ring follow pixel edges exactly. Collinear vertices are then dropped.
    """
    ring = np.round(contour_rc * 2.0) / 2.0
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    nxt = np.roll(ring, -1, axis=0)
    step = nxt - ring
    diagonal = (step[:, 0] != 0) & (step[:, 1] != 0)
    if diagonal.any():
        half = (ring * 2.0) % 2.0 == 1.0  # coordinate lies on a pixel edge line
        corner = np.where(half, ring, nxt)[diagonal]
        n_before = np.cumsum(diagonal) - diagonal
        pos = np.arange(len(ring)) + n_before
        out = np.empty((len(ring) + int(diagonal.sum()), 2))
        out[pos] = ring
        out[pos[diagonal] + 1] = corner
        ring = out
    prev = np.roll(ring, 1, axis=0)
    nxt = np.roll(ring, -1, axis=0)
    a, b = ring - prev, nxt - ring
    turn = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return ring[turn != 0]


def mask_to_polygons(mask: np.ndarray, *, scale: float = 1.0) -> MultiPolygon:
    """Outline of a bool mask as a MultiPolygon whose edges follow pixel edges, scaled.

    Pixel ``[r, c]`` is the square ``[c, c+1] x [r, r+1]`` in (x, y) before scaling, so the
    polygon area equals ``mask.sum() * scale**2`` and a single pixel's centroid is
    ``((c + 0.5) * scale, (r + 0.5) * scale)``. Holes are kept, islands inside holes are
    separate polygons. Foreground touching only diagonally forms separate polygons that
    meet at a point. Built from :func:`skimage.measure.find_contours` (level 0.5 on the
    zero-padded mask) with the cut corners restored, then :func:`shapely.make_valid`.

    Args:
        mask: bool (H, W) (nonzero = True).
        scale: size of one mask pixel in the output frame (e.g. level-0 px per mask px).

    Returns:
        MultiPolygon of the polygonal parts; empty when the mask has no True pixel.

    Example:
        >>> m = np.zeros((4, 4), bool); m[1, 2] = True
        >>> mp = mask_to_polygons(m, scale=10.0)
        >>> mp.area, mp.centroid.x, mp.centroid.y
        (100.0, 25.0, 15.0)
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {m.shape}")
    scale = check_number(scale, "scale", positive=True)
    m = m.astype(bool)
    if not m.any():
        return MultiPolygon()

    padded = np.pad(m, 1).astype(np.float64)
    shells: list[np.ndarray] = []
    holes: list[np.ndarray] = []
    for contour in measure.find_contours(padded, 0.5):
        ring = _square_ring(contour)
        if len(ring) < 3:
            continue
        # padded (row, col) -> (x, y) of the unpadded mask: pixel centre (r+1, c+1) -> (c+.5, r+.5)
        xy = np.column_stack([ring[:, 1] - 0.5, ring[:, 0] - 0.5]) * scale
        x, y = xy[:, 0], xy[:, 1]
        signed_area = 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
        # find_contours keeps low values on the left of the contour; with x = col, y = row
        # (y down) outlines of foreground have positive shoelace area, holes negative.
        (shells if signed_area > 0 else holes).append(xy)

    shell_polys = [Polygon(s) for s in shells]
    hole_lists: list[list[np.ndarray]] = [[] for _ in shells]
    if holes:
        hole_polys = [Polygon(h) for h in holes]
        tree = shapely.STRtree(shell_polys)
        hole_idx, shell_idx = tree.query(hole_polys, predicate="covered_by")
        areas = shapely.area(shell_polys)
        parent: dict[int, int] = {}
        for h, s in zip(hole_idx.tolist(), shell_idx.tolist()):
            if h not in parent or areas[s] < areas[parent[h]]:
                parent[h] = s
        for h, s in parent.items():
            hole_lists[s].append(holes[h])
    polys = [Polygon(s, hole_lists[i]) for i, s in enumerate(shells)]

    return MultiPolygon(polygonal_parts(shapely.make_valid(MultiPolygon(polys))))

