"""The annotation record, Camelyon16 group names and colours, the tumour region, rasterising."""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as draw_polygon

from wsi_toolkit.annotations.checks import check_coordinates, check_size
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import Polygonal, as_polygonal, polygonal_parts
from wsi_toolkit.limits import check_number

__all__ = ["TUMOR_GROUPS", "EXCLUDE_GROUPS", "Annotation", "is_tumor_group", "is_exclusion_group", "tumor_region",
           "rasterize", "Polygonal"]

#: Group names that mean "tumour" (Camelyon16 ``_0``/``_1`` and common spellings).
TUMOR_GROUPS: tuple[str, ...] = ("_0", "_1", "Tumor", "tumor", "Tumour", "tumour", "metastases")
#: Group names that mean "not tumour, although inside a tumour annotation" (Camelyon16 ``_2``).
EXCLUDE_GROUPS: tuple[str, ...] = ("_2", "Exclusion", "exclusion")

_TUMOR_KEYS = frozenset(g.casefold() for g in TUMOR_GROUPS)
_EXCLUDE_KEYS = frozenset(g.casefold() for g in EXCLUDE_GROUPS)

_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_DEFAULT_TUMOR_COLOR = "#FF0000"
_DEFAULT_EXCLUDE_COLOR = "#00FF00"


@dataclass(frozen=True)
class Annotation:
    """One annotated region of a slide.

    Attributes
    ----------
    polygon : shapely.Polygon or shapely.MultiPolygon
        The region in level-0 pixel coordinates ``(x, y)``; holes allowed.
    group : str
        ASAP ``PartOfGroup`` or QuPath classification name; ``""`` when the region has none.
    name : str
        Free-text name (ASAP ``Name``, QuPath ``name``); ``""`` when absent.
    properties : Mapping[str, Any]
        Other GeoJSON feature properties (e.g. ``{"measurements": {"Area um^2": 12.0}}``).
        Written to and read from GeoJSON; ASAP XML has no place for them.
    """

    polygon: Polygonal
    group: str = ""
    name: str = ""
    properties: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.polygon, (shapely.Polygon, shapely.MultiPolygon)):
            raise TypeError(
                f"Annotation.polygon must be a shapely Polygon or MultiPolygon in level-0 px, "
                f"got {type(self.polygon).__name__}"
            )


def is_tumor_group(name: str | None) -> bool:
    """True when ``name`` is one of :data:`TUMOR_GROUPS` (case-insensitive, spaces ignored)."""
    return name is not None and name.strip().casefold() in _TUMOR_KEYS


def is_exclusion_group(name: str | None) -> bool:
    """True when ``name`` is one of :data:`EXCLUDE_GROUPS` (case-insensitive, spaces ignored)."""
    return name is not None and name.strip().casefold() in _EXCLUDE_KEYS


def tumor_region(annotations: Iterable[Annotation]) -> Polygonal:
    """The tumour area of a slide: union of tumour groups minus union of exclusion groups.

    Parameters
    ----------
    annotations : iterable of Annotation
        Any mix of groups; groups that are neither tumour nor exclusion are ignored.

    Returns
    -------
    shapely.Polygon or shapely.MultiPolygon
        Level-0 px. An empty ``Polygon`` when there is no tumour annotation.
    """
    tumor, exclude = [], []
    for ann in annotations:
        if is_tumor_group(ann.group):
            tumor.append(ann.polygon)
        elif is_exclusion_group(ann.group):
            exclude.append(ann.polygon)
    if not tumor:
        return shapely.Polygon()
    region = shapely.union_all(tumor)
    if exclude:
        region = region.difference(shapely.union_all(exclude))
    return as_polygonal(polygonal_parts(region))


# --------------------------------------------------------------------------------------------
# Group colours (used by both writers)
# --------------------------------------------------------------------------------------------


def check_colors(group_colors: Mapping[str, str] | None) -> dict[str, str]:
    """``group_colors`` as a dict, every colour checked to be ``"#RRGGBB"`` (ConfigError)."""
    colors = dict(group_colors or {})
    for group, color in colors.items():
        if not (isinstance(color, str) and _HEX_COLOR.match(color)):
            raise ConfigError(
                f"group_colors[{group!r}] = {color!r}; colours must be '#RRGGBB', e.g. '#FF0000'"
            )
    return colors


def group_color(group: str, colors: Mapping[str, str]) -> str:
    """The colour of ``group``: given, else red for tumour, green for exclusion, else fixed per name."""
    if group in colors:
        return colors[group]
    if is_tumor_group(group):
        return _DEFAULT_TUMOR_COLOR
    if is_exclusion_group(group):
        return _DEFAULT_EXCLUDE_COLOR
    # A fixed colour per name, so files written twice are identical apart from feature ids.
    return f"#{zlib.crc32(group.encode('utf-8')) & 0xFFFFFF:06X}"


def hex_to_rgb(color: str) -> list[int]:
    """``"#RRGGBB"`` -> ``[r, g, b]``."""
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


# --------------------------------------------------------------------------------------------
# Rasterising
# --------------------------------------------------------------------------------------------


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
