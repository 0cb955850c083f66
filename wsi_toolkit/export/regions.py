"""Tumour regions of a heatmap: polygons in level-0 px with measurements; GeoJSON and ASAP XML.

A region is an 8-connected component of the predicted cells with ``prob >= threshold``. Its
outline follows the cell edges (:func:`wsi_toolkit.geometry.mask_to_polygons` scaled by
``cell_l0``), so the polygon is exactly the union of its cells' level-0 squares.

Measurements
------------
- ``max_prob``, ``mean_prob``: over the component's cells (unweighted mean).
- ``area_mm2``: polygon area (level-0 px^2) x ``l0_mpp**2`` / 1e6.
- ``longest_diameter_um``: the largest distance between two vertices of the polygon's convex
  hull (the region's caliper diameter, as Camelyon16's "longest axis"), x ``l0_mpp``.
- ``max_tta_std``, ``mean_tta_std`` (only with an uncertainty map, ``wsi-infer --tta``): the
  maximum and mean over the component's cells of the test-time-augmentation views' standard
  deviation; ``max_mc_dropout_std``, ``mean_mc_dropout_std`` the same of the MC-dropout samples'
  (``wsi-infer --mc-dropout``).
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass

import numpy as np
import shapely
import shapely.affinity
from scipy.spatial.distance import pdist
from skimage import measure

from wsi_toolkit.annotations import Annotation, write_asap_xml, write_geojson
from wsi_toolkit.errors import ConfigError
from wsi_toolkit.geometry import mask_to_polygons
from wsi_toolkit.heatmap import Heatmap
from wsi_toolkit.limits import check_fraction, check_number

__all__ = ["TumorRegion", "tumor_regions", "write_regions_geojson", "write_regions_asap", "region_feature_id",
           "TUMOR_GROUP"]

#: Group / QuPath classification of the written regions.
TUMOR_GROUP = "Tumor"


@dataclass(frozen=True)
class TumorRegion:
    """One tumour region of a heatmap.

    Attributes
    ----------
    polygon_l0 : shapely.Polygon or shapely.MultiPolygon
        Outline in level-0 px ``(x, y)``, following heatmap cell edges; holes kept.
        A MultiPolygon when cells touch only at corners.
    max_prob, mean_prob : float
        Maximum and mean probability over the region's cells.
    area_mm2 : float
        Area in mm^2.
    longest_diameter_um : float
        Largest distance between two points of the region (convex hull vertices), um.
    max_std, mean_std : float or None
        Maximum and mean of the uncertainty map (the TTA views' standard deviation) over the
        region's cells; None without one.
    std_name : str
        What the spread is called in :meth:`measurements` (``max_<std_name>``, ``mean_<std_name>``):
        ``tta_std`` or ``mc_dropout_std``.
    """

    polygon_l0: shapely.Polygon | shapely.MultiPolygon
    max_prob: float
    mean_prob: float
    area_mm2: float
    longest_diameter_um: float
    max_std: float | None = None
    mean_std: float | None = None
    std_name: str = "tta_std"

    def measurements(self) -> dict[str, float]:
        """QuPath-style measurements, as written to GeoJSON."""
        out = {
            "max_probability": self.max_prob,
            "mean_probability": self.mean_prob,
            "area_mm2": self.area_mm2,
            "longest_diameter_um": self.longest_diameter_um,
        }
        if self.max_std is not None and self.mean_std is not None:
            out.update({f"max_{self.std_name}": self.max_std, f"mean_{self.std_name}": self.mean_std})
        return out


def _longest_diameter_l0(geom: shapely.Geometry) -> float:
    hull = geom.convex_hull
    xy = shapely.get_coordinates(hull)
    if len(xy) < 2:
        return 0.0
    return float(pdist(xy).max())


def tumor_regions(heatmap: Heatmap, *, threshold: float = 0.5, min_area_um2: float = 0.0,
                  uncertainty: Heatmap | None = None, std_name: str = "tta_std") -> list[TumorRegion]:
    """Tumour regions: 8-connected components of predicted cells with ``prob >= threshold``.

    Parameters
    ----------
    heatmap : Heatmap
    threshold : float
        Probability in [0, 1] a cell needs to be tumour.
    min_area_um2 : float
        Regions smaller than this (um^2) are dropped.
    uncertainty : Heatmap, optional
        The uncertainty map on the same cells (TTA views' standard deviation): each region gets
        its maximum and mean over the region's cells.
    std_name : str
        The spread's name in the regions' measurements (:attr:`TumorRegion.std_name`).

    Returns
    -------
    list of TumorRegion
        Sorted by ``max_prob`` descending (ties: larger area first).
    """
    check_fraction(threshold, "threshold")
    check_number(min_area_um2, "min_area_um2", bounds=(0.0, math.inf), unit="um^2")
    if uncertainty is not None and uncertainty.shape_rc != heatmap.shape_rc:
        raise ConfigError(f"uncertainty map {uncertainty.shape_rc} and heatmap {heatmap.shape_rc} differ in shape")
    mask = heatmap.predicted & (heatmap.prob >= np.float32(threshold))
    if not mask.any():
        return []
    labels = measure.label(mask, connectivity=2)
    cell_l0, l0_mpp = heatmap.cell_l0, heatmap.l0_mpp
    regions: list[TumorRegion] = []
    for props in measure.regionprops(labels):
        r0, c0, r1, c1 = props.bbox
        component = labels[r0:r1, c0:c1] == props.label
        poly = mask_to_polygons(component, scale=cell_l0)
        poly = shapely.affinity.translate(poly, xoff=c0 * cell_l0, yoff=r0 * cell_l0)
        if len(poly.geoms) == 1:
            poly = poly.geoms[0]
        area_um2 = poly.area * l0_mpp**2
        if area_um2 < min_area_um2:
            continue
        cell_probs = heatmap.prob[r0:r1, c0:c1][component].astype(np.float64)
        cell_std = None if uncertainty is None else uncertainty.prob[r0:r1, c0:c1][component].astype(np.float64)
        regions.append(
            TumorRegion(
                polygon_l0=poly,
                max_prob=float(cell_probs.max()),
                mean_prob=float(cell_probs.mean()),
                area_mm2=area_um2 / 1e6,
                longest_diameter_um=_longest_diameter_l0(poly) * l0_mpp,
                max_std=None if cell_std is None else float(cell_std.max()),
                mean_std=None if cell_std is None else float(cell_std.mean()),
                std_name=std_name,
            )
        )
    regions.sort(key=lambda reg: (-reg.max_prob, -reg.area_mm2))
    return regions


def _annotations(regions: list[TumorRegion], *, slide_name: str = "", measurements: bool) -> list[Annotation]:
    out = []
    for index, reg in enumerate(regions, start=1):
        props: dict = {}
        if measurements:
            props["measurements"] = reg.measurements()
            if slide_name:
                props["metadata"] = {"slide": slide_name}
        out.append(Annotation(polygon=reg.polygon_l0, group=TUMOR_GROUP, name=f"Tumour region {index}",
                              properties=props))
    return out


def write_regions_geojson(path: str | os.PathLike[str], regions: list[TumorRegion], *, slide_name: str = "") -> None:
    """Write regions as a QuPath-importable GeoJSON FeatureCollection (level-0 px), atomically.

    Each region is a Feature with classification ``{"name": "Tumor"}``, name
    ``"Tumour region <i>"`` (1 = highest max probability), ``measurements`` (``max_probability``,
    ``mean_probability``, ``area_mm2``, ``longest_diameter_um``; with ``--tta`` also ``max_tta_std``,
    ``mean_tta_std``) and, when ``slide_name`` is
    given, ``metadata: {"slide": slide_name}``. An empty list writes an empty collection.

    Feature ids are :func:`region_feature_id` (``uuid5`` of the slide name and region number), not
    random: the same slide, model and settings give a byte-identical file, run after run.
    """
    regions = list(regions)
    ids = [region_feature_id(slide_name, index) for index in range(1, len(regions) + 1)]
    write_geojson(path, _annotations(regions, slide_name=slide_name, measurements=True), feature_ids=ids)


#: Namespace of the region feature ids (uuid5 of ``"wsi-toolkit.tumour-region"`` in the URL namespace).
_REGION_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "wsi-toolkit.tumour-region")


def region_feature_id(slide_name: str, index: int) -> str:
    """GeoJSON Feature id of region ``index`` (1 = highest max probability) of ``slide_name``:
    a UUID (QuPath wants one), derived from the slide name and index rather than random."""
    return str(uuid.uuid5(_REGION_NAMESPACE, f"{slide_name}\x00{int(index)}"))


def write_regions_asap(path: str | os.PathLike[str], regions: list[TumorRegion]) -> None:
    """Write regions as ASAP / Camelyon16 XML, group ``Tumor`` (level-0 px), atomically.

    ASAP has no holes: a region's holes are written as group ``_2`` (Camelyon16's exclusion
    group), as :func:`wsi_toolkit.annotations.write_asap_xml` does for tumour groups.
    """
    write_asap_xml(path, _annotations(list(regions), measurements=False))
