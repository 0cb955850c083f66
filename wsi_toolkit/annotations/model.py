"""The annotation record, Camelyon16 group names and colours, the tumour region.

The record and its vocabulary only: validation lives in :mod:`.checks` (which imports this module,
never the reverse) and rasterising, which validates its input there, in :mod:`.raster`.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import shapely

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import Polygonal, as_polygonal, polygonal_parts

__all__ = ["TUMOR_GROUPS", "EXCLUDE_GROUPS", "Annotation", "is_tumor_group", "is_exclusion_group", "tumor_region",
           "Polygonal"]

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
