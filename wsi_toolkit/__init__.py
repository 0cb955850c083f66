"""wsi-toolkit: slide-level computational pathology (tissue, tiling, heatmaps) for Camelyon16-style WSIs.

The public API (``docs/api.md``)::

    import wsi_toolkit as wt
    package = wt.load_model_package("model/")
    analysis = wt.analyse_slide("slide.svs", package)      # in memory: tissue, grid, probs, heatmap, regions
    wt.write_outputs(analysis, "out/slide")                 # the files wsi-infer writes, run.json last

Names are imported on first use (``import wsi_toolkit`` does not import torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from wsi_toolkit.errors import (
    AnnotationError,
    ConfigError,
    MissingMppError,
    ModelPackageError,
    NoPatchesError,
    SlideFormatError,
    SlideNotFoundError,
    SlideReadError,
    WsiToolkitError,
)
from wsi_toolkit.slide import SlideReader, open_slide
from wsi_toolkit.version import __version__

#: Public name -> module that defines it (imported when the name is first used).
_LAZY = {
    "detect_tissue": "wsi_toolkit.tissue",
    "TissueConfig": "wsi_toolkit.tissue",
    "TissueMask": "wsi_toolkit.tissue",
    "make_grid": "wsi_toolkit.tiling",
    "GridConfig": "wsi_toolkit.tiling",
    "PatchGrid": "wsi_toolkit.tiling",
    "Heatmap": "wsi_toolkit.heatmap",
    "stitch": "wsi_toolkit.heatmap",
    "load_model_package": "wsi_toolkit.model_package",
    "ModelPackage": "wsi_toolkit.model_package",
    "InferenceConfig": "wsi_toolkit.inference",
    "run_inference": "wsi_toolkit.inference",
    "RunConfig": "wsi_toolkit.analysis",
    "SlideAnalysis": "wsi_toolkit.analysis",
    "analyse_slide": "wsi_toolkit.analysis",
    "write_outputs": "wsi_toolkit.analysis",
    "RunRecord": "wsi_toolkit.records",
    "run_batch": "wsi_toolkit.pipeline",
    "tumor_regions": "wsi_toolkit.export",
    "TumorRegion": "wsi_toolkit.export",
    "write_heatmap_tiff": "wsi_toolkit.export",
    "read_heatmap_tiff": "wsi_toolkit.export",
    "render_overlay": "wsi_toolkit.export",
    "read_asap_xml": "wsi_toolkit.annotations",
    "write_asap_xml": "wsi_toolkit.annotations",
    "read_geojson": "wsi_toolkit.annotations",
    "write_geojson": "wsi_toolkit.annotations",
}

__all__ = [
    "open_slide",
    "SlideReader",
    *_LAZY,
    "WsiToolkitError",
    "SlideNotFoundError",
    "SlideFormatError",
    "SlideReadError",
    "MissingMppError",
    "NoPatchesError",
    "ConfigError",
    "AnnotationError",
    "ModelPackageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from wsi_toolkit.analysis import RunConfig, SlideAnalysis, analyse_slide, write_outputs
    from wsi_toolkit.annotations import read_asap_xml, read_geojson, write_asap_xml, write_geojson
    from wsi_toolkit.export import TumorRegion, read_heatmap_tiff, render_overlay, tumor_regions, write_heatmap_tiff
    from wsi_toolkit.heatmap import Heatmap, stitch
    from wsi_toolkit.inference import InferenceConfig, run_inference
    from wsi_toolkit.model_package import ModelPackage, load_model_package
    from wsi_toolkit.pipeline import run_batch
    from wsi_toolkit.records import RunRecord
    from wsi_toolkit.tiling import GridConfig, PatchGrid, make_grid
    from wsi_toolkit.tissue import TissueConfig, TissueMask, detect_tissue
