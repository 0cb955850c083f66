"""Annotation polygons in and out: ASAP XML (Camelyon16), GeoJSON (QuPath); rasterise to masks.

Every coordinate here is ``(x, y)`` in level-0 pixels of the slide, the frame both ASAP and
QuPath use for their files. Masks are indexed ``[row, col]``.

- :mod:`.model`: :class:`Annotation`, group names, :func:`tumor_region` (imports no other module here)
- :mod:`.checks`: :func:`check_on_slide` and the checks every reader applies (on :mod:`.model`'s records)
- :mod:`.raster`: :func:`rasterize`
- :mod:`.asap`: :func:`read_asap_xml`, :func:`write_asap_xml`
- :mod:`.geojson`: :func:`read_geojson`, :func:`write_geojson`
- :mod:`.review`: a pathologist's review (``review.geojson``, wsi-view's review mode): :func:`read_review`,
  :func:`validate_review`, :func:`save_review` (versioned, history, conflict check), :func:`import_review`

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

from wsi_toolkit.annotations.asap import read_asap_xml, write_asap_xml
from wsi_toolkit.annotations.checks import MAX_ANNOTATION_BYTES, check_on_slide
from wsi_toolkit.annotations.geojson import read_geojson, write_geojson
from wsi_toolkit.annotations.model import (
    EXCLUDE_GROUPS,
    TUMOR_GROUPS,
    Annotation,
    is_exclusion_group,
    is_tumor_group,
    tumor_region,
)
from wsi_toolkit.annotations.model import (
    Polygonal as Polygonal,
)
from wsi_toolkit.annotations.raster import rasterize
from wsi_toolkit.annotations.review import (
    REVIEW_CLASSES,
    Review,
    ReviewFeature,
    import_review,
    load_review,
    read_review,
    save_review,
    validate_review,
)

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
    "REVIEW_CLASSES",
    "Review",
    "ReviewFeature",
    "read_review",
    "load_review",
    "validate_review",
    "save_review",
    "import_review",
]
