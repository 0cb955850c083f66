"""GeoJSON annotations (QuPath's export and import): read and write (level-0 px)."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import shapely
import shapely.geometry

from wsi_toolkit.annotations.checks import check_coordinates, check_on_slide, check_readable, repair
from wsi_toolkit.annotations.model import Annotation, check_colors, group_color, hex_to_rgb
from wsi_toolkit.atomic import write_text_atomic
from wsi_toolkit.errors import AnnotationError, ConfigError, one_line

__all__ = ["read_geojson", "write_geojson"]

logger = logging.getLogger(__name__)


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
    check_readable(path)

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
        check_coordinates(geom, where)
        polygon = repair(geom, where)
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
    feature_ids: Sequence[str] | None = None,
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
    feature_ids : sequence of str, optional
        One Feature id per annotation, in order (e.g. derived from the slide name, so that the
        file is the same run after run); default a random ``uuid4`` each.

    Raises
    ------
    ConfigError
        A colour is not ``"#RRGGBB"``.
    AnnotationError
        A coordinate is not finite or a property cannot be written as JSON.
    """
    path = Path(path)
    colors = check_colors(group_colors)
    annotations = list(annotations)
    if feature_ids is not None and len(feature_ids) != len(annotations):
        raise ConfigError(f"feature_ids: {len(feature_ids)} ids for {len(annotations)} annotations; give one each")
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
            rgb = hex_to_rgb(group_color(ann.group, colors))
            props["classification"] = {"name": ann.group, "color": rgb}
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid4()) if feature_ids is None else str(feature_ids[index]),
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
    write_text_atomic(path, text + "\n")


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
