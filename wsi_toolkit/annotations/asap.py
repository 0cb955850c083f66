"""ASAP / Camelyon16 annotation XML: read and write (level-0 px)."""

from __future__ import annotations

import logging
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from pathlib import Path

import shapely

from wsi_toolkit.annotations.checks import check_on_slide, check_readable, repair
from wsi_toolkit.annotations.model import (
    EXCLUDE_GROUPS,
    Annotation,
    check_colors,
    group_color,
    is_tumor_group,
)
from wsi_toolkit.atomic import write_text_atomic
from wsi_toolkit.errors import AnnotationError, one_line
from wsi_toolkit.geometry import polygonal_parts
from wsi_toolkit.limits import MAX_COORD_L0

__all__ = ["read_asap_xml", "write_asap_xml"]

logger = logging.getLogger(__name__)

# ASAP annotation types whose coordinates outline an area.
_ASAP_AREA_TYPES = frozenset({"polygon", "spline", "rectangle"})
# ASAP annotation types that are points, not areas.
_ASAP_POINT_TYPES = frozenset({"dot", "pointset"})
# ASAP writes "None" for "no group".
_ASAP_NO_GROUP = "None"


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
    check_readable(path)
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
        geom = repair(shapely.Polygon(l0_xy), where)
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
    colors = check_colors(group_colors)
    root = ET.Element("ASAP_Annotations")
    ann_parent = ET.SubElement(root, "Annotations")
    groups_used: list[str] = []
    counter = 0

    def add(l0_ring: shapely.LinearRing, group: str, name: str) -> None:
        nonlocal counter
        color = group_color(group, colors)
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
        parts = [p for p in polygonal_parts(ann.polygon) if not p.is_empty]
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
            groups_elem, "Group", Name=group, PartOfGroup=_ASAP_NO_GROUP, Color=group_color(group, colors)
        )
        ET.SubElement(group_elem, "Attributes")

    ET.indent(root, space="\t")
    text = '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    write_text_atomic(path, text)


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
