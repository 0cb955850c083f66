"""Annotation polygons in and out: ASAP XML (Camelyon16), GeoJSON (QuPath); rasterise to masks.

Every coordinate here is ``(x, y)`` in level-0 pixels of the slide, the frame both ASAP and
QuPath use for their files. Masks are indexed ``[row, col]``.

Camelyon16 convention
---------------------
Lesion annotations are in groups ``_0`` and ``_1`` (older files: ``Tumor``, ``metastases``),
and regions *inside* a lesion that are not tumour are in group ``_2``. The tumour region of a
slide is therefore ``union(tumour groups) - union(exclusion groups)``, see :func:`tumor_region`.

Example
-------
>>> anns = read_asap_xml("tumor_001.xml")                                # doctest: +SKIP
>>> region = tumor_region(anns)                                         # doctest: +SKIP
>>> mask_rc = rasterize(region, l0_size=(97792, 221184), l0_mpp=0.243,
...                     mask_mpp=7.776)                                   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
import zlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.geometry
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as draw_polygon

from wsi_toolkit.errors import AnnotationError, ConfigError, one_line
from wsi_toolkit.limits import MAX_COORD_L0

__all__ = [
    "TUMOR_GROUPS",
    "EXCLUDE_GROUPS",
    "Annotation",
    "read_asap_xml",
    "write_asap_xml",
    "read_geojson",
    "write_geojson",
    "tumor_region",
    "rasterize",
    "is_tumor_group",
    "is_exclusion_group",
    "check_on_slide",
    "MAX_ANNOTATION_BYTES",
]

logger = logging.getLogger(__name__)

#: Group names that mean "tumour" (Camelyon16 ``_0``/``_1`` and common spellings).
TUMOR_GROUPS: tuple[str, ...] = ("_0", "_1", "Tumor", "tumor", "Tumour", "tumour", "metastases")
#: Group names that mean "not tumour, although inside a tumour annotation" (Camelyon16 ``_2``).
EXCLUDE_GROUPS: tuple[str, ...] = ("_2", "Exclusion", "exclusion")

_TUMOR_KEYS = frozenset(g.casefold() for g in TUMOR_GROUPS)
_EXCLUDE_KEYS = frozenset(g.casefold() for g in EXCLUDE_GROUPS)

# ASAP annotation types whose coordinates outline an area.
_ASAP_AREA_TYPES = frozenset({"polygon", "spline", "rectangle"})
# ASAP annotation types that are points, not areas.
_ASAP_POINT_TYPES = frozenset({"dot", "pointset"})
# ASAP writes "None" for "no group".
_ASAP_NO_GROUP = "None"

_HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_DEFAULT_TUMOR_COLOR = "#FF0000"
_DEFAULT_EXCLUDE_COLOR = "#00FF00"

Polygonal = shapely.Polygon | shapely.MultiPolygon

#: Annotation files larger than this are refused, not parsed (Camelyon16's largest XML is ~5 MiB).
MAX_ANNOTATION_BYTES = 256 * 2**20


# --------------------------------------------------------------------------------------------
# The annotation record and group names
# --------------------------------------------------------------------------------------------


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
    return _as_polygonal(_polygonal_parts(region))


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
    l0_w, l0_h = _check_size(l0_size)
    l0_mpp = _check_mpp("l0_mpp", l0_mpp)
    mask_mpp = _check_mpp("mask_mpp", mask_mpp)
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

    parts = _polygonal_parts(geometry)
    for poly in parts:
        _check_coordinates(poly, "rasterize")
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


def _check_mpp(label: str, value: float) -> float:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"rasterize: {label} must be a positive number of um/px, got {value!r}")
    return mpp


def _check_size(l0_size: Sequence[int]) -> tuple[int, int]:
    try:
        l0_w, l0_h = (int(v) for v in l0_size)
    except (TypeError, ValueError):
        raise ConfigError(f"rasterize: l0_size must be (width, height) in px, got {l0_size!r}") from None
    if l0_w <= 0 or l0_h <= 0:
        raise ConfigError(f"rasterize: l0_size must be positive (width, height) in px, got {l0_size!r}")
    return l0_w, l0_h


# --------------------------------------------------------------------------------------------
# ASAP XML
# --------------------------------------------------------------------------------------------


def read_asap_xml(path: str | os.PathLike[str], *, l0_size: tuple[int, int] | None = None) -> list[Annotation]:
    """Read an ASAP / Camelyon16 annotation XML file.

    Types ``Polygon``, ``Spline`` (its control points taken as polygon vertices) and
    ``Rectangle`` become polygons; ``Dot`` and ``PointSet`` and unknown types are skipped with a
    logged warning, as are outlines with fewer than 3 distinct points. Coordinates are sorted by
    their ``Order``; numbers with a decimal comma (``"1234,5"``) or in scientific notation
    (``"1.2e+04"``) are accepted. Self-intersecting outlines are repaired with
    :func:`shapely.make_valid`, keeping only the areal parts. ``PartOfGroup="None"`` reads as
    group ``""``.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.xml`` file.
    l0_size : (int, int), optional
        The slide's level-0 ``(width, height)``: the annotations are then checked against it
        (:func:`check_on_slide`).

    Returns
    -------
    list of Annotation
        In file order; polygons in level-0 px.

    Raises
    ------
    AnnotationError
        The file is missing, larger than 256 MiB, is not well-formed XML, is not an ASAP file, or
        holds a number that cannot be parsed or is not a level-0 coordinate (``|v| > 2**24``); with
        ``l0_size``, an outline off the slide or around all of it.
    """
    path = Path(path)
    _check_readable(path)
    try:
        root = ET.parse(path).getroot()
    except RecursionError:
        raise AnnotationError(f"{path}: XML nested too deeply to be ASAP annotations") from None
    except ET.ParseError as exc:
        raise AnnotationError(
            f"{path}: not well-formed XML ({one_line(exc)}); re-export the annotations from ASAP or fix the file"
        ) from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(
            f"{path}: root element is <{root.tag}>, not <ASAP_Annotations>; "
            "this is not an ASAP/Camelyon16 annotation file (GeoJSON? use read_geojson)"
        )

    annotations: list[Annotation] = []
    for index, elem in enumerate(root.iter("Annotation")):
        name = elem.get("Name", "") or ""
        where = f"{path}: annotation {index} ({name!r})"
        ann_type = (elem.get("Type") or "Polygon").strip()
        if ann_type.casefold() in _ASAP_POINT_TYPES:
            logger.warning("%s: type %s is points, not an area; skipped", where, ann_type)
            continue
        if ann_type.casefold() not in _ASAP_AREA_TYPES:
            logger.warning("%s: unknown type %r; skipped", where, ann_type)
            continue

        ordered = []
        for pos, coord in enumerate(elem.iter("Coordinate")):
            order_text = coord.get("Order")
            order = pos if order_text is None else _parse_number(order_text, where, "Order")
            x = _parse_number(coord.get("X"), where, "X")
            y = _parse_number(coord.get("Y"), where, "Y")
            ordered.append((order, pos, x, y))
        ordered.sort()
        l0_xy = [(x, y) for _, _, x, y in ordered]
        if len(set(l0_xy)) < 3:
            logger.warning("%s: %d distinct point(s), a polygon needs 3; skipped", where, len(set(l0_xy)))
            continue

        group = (elem.get("PartOfGroup") or "").strip()
        if group == _ASAP_NO_GROUP:
            group = ""
        geom = _repair(shapely.Polygon(l0_xy), where)
        if geom is None:
            continue
        annotations.append(Annotation(polygon=geom, group=group, name=name))
    if l0_size is not None:
        check_on_slide(annotations, l0_size, where=str(path))
    return annotations


def write_asap_xml(
    path: str | os.PathLike[str],
    annotations: Iterable[Annotation],
    *,
    group_colors: Mapping[str, str] | None = None,
) -> None:
    """Write annotations as an ASAP / Camelyon16 XML file (atomically).

    ASAP annotations are simple outlines, so:

    - a MultiPolygon is written as one ``<Annotation>`` per part (names get `` part N``);
    - ASAP has no holes: a hole of a *tumour*-group polygon is written as its own annotation in
      the exclusion group ``_2`` (the Camelyon16 way, so :func:`tumor_region` of the file read
      back equals the original); holes of any other group are dropped with a logged warning.

    Group ``""`` is written as ``PartOfGroup="None"``. The ``<AnnotationGroups>`` section lists
    every group used, in order of first use. ``properties`` are not written (ASAP has no place
    for them; use GeoJSON).

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.xml``; written to a temporary file in the same folder, then renamed over it.
    annotations : iterable of Annotation
        Polygons in level-0 px. Empty polygons are skipped with a warning.
    group_colors : mapping of str to str, optional
        Group name -> ``"#RRGGBB"``. Defaults: tumour groups red, exclusion groups green,
        others a fixed colour derived from the name.

    Raises
    ------
    ConfigError
        A colour is not ``"#RRGGBB"``.
    """
    path = Path(path)
    colors = _check_colors(group_colors)
    root = ET.Element("ASAP_Annotations")
    ann_parent = ET.SubElement(root, "Annotations")
    groups_used: list[str] = []
    counter = 0

    def add(l0_ring: shapely.LinearRing, group: str, name: str) -> None:
        nonlocal counter
        color = _group_color(group, colors)
        elem = ET.SubElement(
            ann_parent,
            "Annotation",
            Name=name or f"Annotation {counter}",
            Type="Polygon",
            PartOfGroup=group or _ASAP_NO_GROUP,
            Color=color,
        )
        coords_elem = ET.SubElement(elem, "Coordinates")
        for order, (x, y) in enumerate(list(l0_ring.coords)[:-1]):  # drop the closing point
            ET.SubElement(coords_elem, "Coordinate", Order=str(order), X=repr(float(x)), Y=repr(float(y)))
        if group and group not in groups_used:
            groups_used.append(group)
        counter += 1

    for index, ann in enumerate(annotations):
        parts = [p for p in _polygonal_parts(ann.polygon) if not p.is_empty]
        if not parts:
            logger.warning("%s: annotation %d (%r) is empty; not written", path, index, ann.name)
            continue
        for part_no, poly in enumerate(parts, start=1):
            name = ann.name if len(parts) == 1 or not ann.name else f"{ann.name} part {part_no}"
            add(poly.exterior, ann.group, name)
            if not poly.interiors:
                continue
            if is_tumor_group(ann.group):
                for hole_no, hole in enumerate(poly.interiors, start=1):
                    add(hole, EXCLUDE_GROUPS[0], f"{name or 'Annotation'} hole {hole_no}")
            else:
                logger.warning(
                    "%s: annotation %d (%r, group %r) has %d hole(s); ASAP has no holes and the "
                    "group is not a tumour group, so the holes are dropped",
                    path, index, ann.name, ann.group, len(poly.interiors),
                )

    groups_elem = ET.SubElement(root, "AnnotationGroups")
    for group in groups_used:
        group_elem = ET.SubElement(
            groups_elem, "Group", Name=group, PartOfGroup=_ASAP_NO_GROUP, Color=_group_color(group, colors)
        )
        ET.SubElement(group_elem, "Attributes")

    ET.indent(root, space="\t")
    text = '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    _atomic_write(path, text.encode("utf-8"))


def _parse_number(text: str | None, where: str, attr: str) -> float:
    """Parse an ASAP number: ``"12.5"``, ``"12,5"`` (decimal comma) or ``"1.25e+01"``."""
    if text is None:
        raise AnnotationError(
            f"{where}: a <Coordinate> has no {attr} attribute; every vertex needs X, Y and Order"
        )
    try:
        value = float(text.strip().replace(",", "."))
    except ValueError:
        raise AnnotationError(
            f"{where}: {attr}={text!r} is not a number; fix the value in the file"
        ) from None
    if not math.isfinite(value):
        raise AnnotationError(f"{where}: {attr}={text!r} is not finite; fix the value in the file")
    if attr != "Order" and abs(value) > MAX_COORD_L0:
        raise AnnotationError(
            f"{where}: {attr}={text!r} is not a level-0 pixel of any slide (|{attr}| <= {MAX_COORD_L0:,.0f}); "
            "the file is damaged or not in level-0 pixels")
    return value


# --------------------------------------------------------------------------------------------
# GeoJSON
# --------------------------------------------------------------------------------------------


def read_geojson(path: str | os.PathLike[str], *, l0_size: tuple[int, int] | None = None) -> list[Annotation]:
    """Read polygons from a GeoJSON file (QuPath export or any GeoJSON).

    Accepts a ``FeatureCollection``, a bare list of Features, a single ``Feature`` or a bare
    geometry. The group is ``properties.classification.name`` (QuPath), or
    ``properties.classification`` when it is a string, else ``""``; the name is
    ``properties.name``. All other properties (``objectType``, ``measurements``, ...) are kept in
    :attr:`Annotation.properties`. Point and line geometries are skipped with a logged warning;
    invalid polygons are repaired with :func:`shapely.make_valid`. Feature ids are not kept.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.geojson`` / ``.json`` file, UTF-8.
    l0_size : (int, int), optional
        The slide's level-0 ``(width, height)``: the annotations are then checked against it
        (:func:`check_on_slide`).

    Returns
    -------
    list of Annotation
        In file order; polygons in the file's coordinates (level-0 px for QuPath).

    Raises
    ------
    AnnotationError
        The file is missing, larger than 256 MiB, is not JSON (NaN/Infinity included), nested
        too deeply, is JSON but not GeoJSON, or has a coordinate that is not a level-0 pixel
        (``|v| > 2**24``); with ``l0_size``, an outline off the slide or around all of it.
    """
    path = Path(path)
    _check_readable(path)

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh, parse_constant=no_constant)
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to be GeoJSON (thousands of [ or {{)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise AnnotationError(
            f"{path}: not valid UTF-8 JSON ({one_line(exc)}); export the GeoJSON again or fix the file"
        ) from None

    features = _geojson_features(doc, path)
    annotations: list[Annotation] = []
    for index, feature in enumerate(features):
        where = f"{path}: feature {index}"
        if not isinstance(feature, Mapping):
            raise AnnotationError(f"{where} is a {type(feature).__name__}, not a GeoJSON Feature object")
        geom_doc = feature.get("geometry")
        if geom_doc is None:
            logger.warning("%s has no geometry; skipped", where)
            continue
        try:
            geom = shapely.geometry.shape(geom_doc)
        except RecursionError:
            raise AnnotationError(f"{where}: geometry nested too deeply; fix or remove this feature") from None
        except Exception as exc:  # shapely raises several types for malformed geometry
            raise AnnotationError(
                f"{where}: malformed geometry ({one_line(exc, 200)}); fix or remove this feature"
            ) from None
        if not isinstance(geom, (shapely.Polygon, shapely.MultiPolygon, shapely.GeometryCollection)):
            logger.warning("%s: %s is not an area; skipped", where, geom.geom_type)
            continue
        _check_coordinates(geom, where)
        polygon = _repair(geom, where)
        if polygon is None:
            continue
        props = feature.get("properties") or {}
        if not isinstance(props, Mapping):
            raise AnnotationError(
                f"{where}: properties is a {type(props).__name__}; GeoJSON needs an object or null"
            )
        annotations.append(
            Annotation(
                polygon=polygon,
                group=_classification_name(props.get("classification")),
                name=str(props.get("name") or ""),
                properties={k: v for k, v in props.items() if k not in ("name", "classification")},
            )
        )
    if l0_size is not None:
        check_on_slide(annotations, l0_size, where=str(path))
    return annotations


def write_geojson(
    path: str | os.PathLike[str],
    annotations: Iterable[Annotation],
    *,
    group_colors: Mapping[str, str] | None = None,
) -> None:
    """Write annotations as a QuPath-importable GeoJSON FeatureCollection (atomically).

    Each annotation becomes one Feature (a MultiPolygon stays one Feature; holes are kept)::

        {"type": "Feature", "id": "<uuid4>", "geometry": {...},
         "properties": {"objectType": "annotation", "name": ...,
                        "classification": {"name": group, "color": [r, g, b]},
                        "measurements": {...}, ...other properties}}

    ``name`` and ``classification`` are omitted when empty. Other properties are written as given
    (``objectType`` defaults to ``"annotation"``).

    Parameters
    ----------
    path : str or os.PathLike
        Output file; written to a temporary file in the same folder, then renamed over it.
    annotations : iterable of Annotation
        Polygons in level-0 px. Empty polygons are skipped with a warning.
    group_colors : mapping of str to str, optional
        Group name -> ``"#RRGGBB"``; defaults as in :func:`write_asap_xml`.

    Raises
    ------
    ConfigError
        A colour is not ``"#RRGGBB"``.
    AnnotationError
        A coordinate is not finite or a property cannot be written as JSON.
    """
    path = Path(path)
    colors = _check_colors(group_colors)
    features = []
    for index, ann in enumerate(annotations):
        if ann.polygon.is_empty:
            logger.warning("%s: annotation %d (%r) is empty; not written", path, index, ann.name)
            continue
        props: dict[str, Any] = {"objectType": "annotation"}
        props.update((k, v) for k, v in ann.properties.items() if k not in ("name", "classification"))
        if ann.name:
            props["name"] = ann.name
        if ann.group:
            rgb = _hex_to_rgb(_group_color(ann.group, colors))
            props["classification"] = {"name": ann.group, "color": rgb}
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()),
                "geometry": shapely.geometry.mapping(ann.polygon),
                "properties": props,
            }
        )
    try:
        text = json.dumps({"type": "FeatureCollection", "features": features}, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AnnotationError(
            f"{path}: cannot write as JSON ({one_line(exc)}); coordinates must be finite and properties "
            "JSON-serialisable (str, numbers, lists, dicts)"
        ) from None
    _atomic_write(path, (text + "\n").encode("utf-8"))


def _geojson_features(doc: Any, path: Path) -> list[Any]:
    """The list of Feature objects in any of the accepted GeoJSON layouts."""
    if isinstance(doc, list):
        features = []
        for index, item in enumerate(doc):
            if _is_feature(item):
                features.append(item)
            elif _is_geometry(item):
                features.append({"type": "Feature", "geometry": item, "properties": {}})
            else:
                raise AnnotationError(
                    f"{path}: item {index} of the top-level list is neither a GeoJSON Feature nor a "
                    "geometry; expected a list of Features as exported by QuPath"
                )
        return features
    if isinstance(doc, Mapping):
        kind = doc.get("type")
        if kind == "FeatureCollection" and isinstance(doc.get("features"), list):
            return list(doc["features"])
        if _is_feature(doc):
            return [doc]
        if _is_geometry(doc):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
        found = f"an object with type {kind!r}" if kind is not None else "an object without a 'type'"
    else:
        found = f"a JSON {type(doc).__name__}"
    raise AnnotationError(
        f"{path}: JSON but not GeoJSON (found {found}); expected a FeatureCollection, a list of "
        "Features, a Feature or a geometry, as exported by QuPath (File > Export objects as GeoJSON)"
    )


def _is_feature(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("type") == "Feature"


def _is_geometry(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("type") in {
        "Point", "MultiPoint", "LineString", "MultiLineString",
        "Polygon", "MultiPolygon", "GeometryCollection",
    }  # fmt: skip


def _classification_name(classification: Any) -> str:
    if isinstance(classification, Mapping):
        name = classification.get("name")
        return str(name) if name is not None else ""
    if isinstance(classification, str):
        return classification
    return ""


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file not found; check the path")
    if not path.is_file():
        raise AnnotationError(f"{path}: not a file (a directory?); pass the annotation file itself")
    size = path.stat().st_size
    if size > MAX_ANNOTATION_BYTES:
        raise AnnotationError(
            f"{path}: {size:,} bytes; annotation files of whole slides are a few MiB (at most "
            f"{MAX_ANNOTATION_BYTES // 2**20} MiB are read); is it the right file?")


def _check_coordinates(geom: BaseGeometry, where: str) -> None:
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
    w, h = _check_size(l0_size)
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


def _polygonal_parts(geom: BaseGeometry) -> list[shapely.Polygon]:
    """The non-empty Polygons in ``geom`` (recursing into multi-parts and collections)."""
    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, shapely.Polygon):
        return [geom]
    if isinstance(geom, (shapely.MultiPolygon, shapely.GeometryCollection)):
        return [p for part in geom.geoms for p in _polygonal_parts(part)]
    return []


def _as_polygonal(polys: Sequence[shapely.Polygon]) -> Polygonal:
    if not polys:
        return shapely.Polygon()
    if len(polys) == 1:
        return polys[0]
    return shapely.MultiPolygon(list(polys))


def _repair(geom: BaseGeometry, where: str) -> Polygonal | None:
    """``geom`` as a valid Polygon/MultiPolygon, or None (with a warning) if it has no area."""
    if not geom.is_valid:
        reason = shapely.is_valid_reason(geom)
        logger.warning("%s: invalid outline (%s); repaired with make_valid", where, reason)
        geom = shapely.make_valid(geom)
    parts = [p for p in _polygonal_parts(geom) if p.area > 0]
    if not parts:
        logger.warning("%s: outline has no area; skipped", where)
        return None
    all_parts_kept = len(parts) == len(_polygonal_parts(geom))
    if isinstance(geom, (shapely.Polygon, shapely.MultiPolygon)) and all_parts_kept:
        return geom
    return _as_polygonal(parts)


def _check_colors(group_colors: Mapping[str, str] | None) -> dict[str, str]:
    colors = dict(group_colors or {})
    for group, color in colors.items():
        if not (isinstance(color, str) and _HEX_COLOR.match(color)):
            raise ConfigError(
                f"group_colors[{group!r}] = {color!r}; colours must be '#RRGGBB', e.g. '#FF0000'"
            )
    return colors


def _group_color(group: str, colors: Mapping[str, str]) -> str:
    if group in colors:
        return colors[group]
    if is_tumor_group(group):
        return _DEFAULT_TUMOR_COLOR
    if is_exclusion_group(group):
        return _DEFAULT_EXCLUDE_COLOR
    # A fixed colour per name, so files written twice are identical apart from feature ids.
    return f"#{zlib.crc32(group.encode('utf-8')) & 0xFFFFFF:06X}"


def _hex_to_rgb(color: str) -> list[int]:
    return [int(color[i : i + 2], 16) for i in (1, 3, 5)]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666 lets the umask decide permissions, as for an ordinary open().
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
