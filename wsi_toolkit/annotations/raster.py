"""Rasterising a level-0 geometry to a boolean mask (:func:`rasterize`), its input checked by :mod:`.checks`."""

from __future__ import annotations

import math

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as draw_polygon

from wsi_toolkit.annotations.checks import check_coordinates, check_size
from wsi_toolkit.geometry import polygonal_parts
from wsi_toolkit.limits import check_number

__all__ = ["rasterize"]


def rasterize(
    geometry: BaseGeometry,
    *,
    l0_size: tuple[int, int],
    l0_mpp: float,
    mask_mpp: float,
) -> np.ndarray:
    """Rasterise a level-0 geometry to a boolean mask at ``mask_mpp`` micrometres per pixel.

    With ``k = mask_mpp / l0_mpp`` (level-0 px per mask px), mask pixel ``[r, c]`` covers level-0
    ``x in [c*k, (c+1)*k)``, ``y in [r*k, (r+1)*k)`` and is True when its centre
    ``((c + 0.5) * k, (r + 0.5) * k)`` lies inside the geometry. Holes are respected and
    MultiPolygons / GeometryCollections are handled (non-areal parts are ignored). A centre
    exactly on an outer edge counts as inside, one exactly on a hole's edge as outside
    (``skimage.draw.polygon`` includes boundary points).

    Parameters
    ----------
    geometry : shapely geometry
        Polygon, MultiPolygon or GeometryCollection in level-0 px ``(x, y)``; may be empty.
    l0_size : (int, int)
        Level-0 slide size ``(width, height)`` in px.
    l0_mpp : float
        Level-0 resolution, micrometres per pixel.
    mask_mpp : float
        Mask resolution, micrometres per pixel (usually coarser than ``l0_mpp``).

    Returns
    -------
    numpy.ndarray of bool, shape ``(ceil(h0 / k), ceil(w0 / k))``
        The mask, indexed ``[row, col]``. The ceiling forgives float noise below 1e-9 px.

    Raises
    ------
    ConfigError
        A size or resolution is not positive and finite.
    """
    l0_w, l0_h = check_size(l0_size, "rasterize: l0_size")
    l0_mpp = check_number(l0_mpp, "rasterize: l0_mpp", positive=True, unit="um/px")
    mask_mpp = check_number(mask_mpp, "rasterize: mask_mpp", positive=True, unit="um/px")
    l0_per_mask_px = mask_mpp / l0_mpp
    mask_shape = (
        max(1, math.ceil(l0_h / l0_per_mask_px - 1e-9)),
        max(1, math.ceil(l0_w / l0_per_mask_px - 1e-9)),
    )
    mask_rc = np.zeros(mask_shape, dtype=bool)

    def to_mask_rc(ring: shapely.LinearRing) -> tuple[np.ndarray, np.ndarray]:
        # Mask frame with pixel centres on integers: mask_c = x / k - 0.5, mask_r = y / k - 0.5.
        l0_xy = np.asarray(ring.coords, dtype=float)
        return l0_xy[:, 1] / l0_per_mask_px - 0.5, l0_xy[:, 0] / l0_per_mask_px - 0.5

    parts = polygonal_parts(geometry)
    for poly in parts:
        check_coordinates(poly, "rasterize")
    for poly in parts:
        if poly.is_empty:
            continue
        ext_r, ext_c = to_mask_rc(poly.exterior)
        rr, cc = draw_polygon(ext_r, ext_c, shape=mask_shape)
        if rr.size == 0:
            continue
        if not poly.interiors:
            mask_rc[rr, cc] = True
            continue
        # Draw exterior minus holes in a local box, then OR it in, so that an island inside
        # another polygon's hole is not erased by that hole.
        r0, c0 = rr.min(), cc.min()
        local = np.zeros((rr.max() - r0 + 1, cc.max() - c0 + 1), dtype=bool)
        local[rr - r0, cc - c0] = True
        for hole in poly.interiors:
            hole_r, hole_c = to_mask_rc(hole)
            hr, hc = draw_polygon(hole_r - r0, hole_c - c0, shape=local.shape)
            local[hr, hc] = False
        mask_rc[r0 : r0 + local.shape[0], c0 : c0 + local.shape[1]] |= local
    return mask_rc
