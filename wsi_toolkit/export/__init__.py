"""Exporters: the heatmap and its tumour regions in the forms pathologists and researchers open.

- :func:`write_heatmap_tiff`: tiled pyramidal TIFF at the heatmap's um/px (OpenSlide, QuPath, ASAP)
- :func:`render_overlay`: overlay PNG (thumbnail + colour map + tissue outline + legend; with --tta an
  uncertainty panel)
- :func:`tumor_regions`, :func:`write_regions_geojson`, :func:`write_regions_asap`: QuPath
  GeoJSON and ASAP XML of thresholded regions, level-0 px, with measurements
- :func:`write_tiles_csv`, :func:`write_summary_csv`, :func:`write_json_atomic`: tables and JSON

Every writer is atomic: a temporary file in the target folder, renamed on success.
"""

from wsi_toolkit.atomic import atomic_path, clean_stale_partials, write_text_atomic
from wsi_toolkit.export.heatmap_tiff import (
    HEATMAP_TIFF_CONTENT,
    UNCERTAINTY_TIFF_CONTENT,
    heatmap_pyramid,
    read_heatmap_tiff,
    write_heatmap_tiff,
)
from wsi_toolkit.export.overlay import (
    INFERNO_LUT,
    UNCERTAINTY_MAX,
    VIRIDIS_LUT,
    blend_heatmap,
    colormap,
    heatmap_on_grid,
    render_overlay,
)
from wsi_toolkit.export.regions import (
    TUMOR_GROUP,
    TumorRegion,
    region_feature_id,
    tumor_regions,
    write_regions_asap,
    write_regions_geojson,
)
from wsi_toolkit.export.tables import (
    SUMMARY_COLUMNS,
    csv_text,
    csv_untext,
    write_json_atomic,
    write_summary_csv,
    write_tiles_csv,
)

__all__ = [
    "atomic_path",
    "clean_stale_partials",
    "write_text_atomic",
    "write_heatmap_tiff",
    "read_heatmap_tiff",
    "heatmap_pyramid",
    "HEATMAP_TIFF_CONTENT",
    "UNCERTAINTY_TIFF_CONTENT",
    "INFERNO_LUT",
    "VIRIDIS_LUT",
    "UNCERTAINTY_MAX",
    "colormap",
    "heatmap_on_grid",
    "blend_heatmap",
    "render_overlay",
    "TUMOR_GROUP",
    "TumorRegion",
    "tumor_regions",
    "region_feature_id",
    "write_regions_geojson",
    "write_regions_asap",
    "SUMMARY_COLUMNS",
    "csv_text",
    "csv_untext",
    "write_tiles_csv",
    "write_summary_csv",
    "write_json_atomic",
]
