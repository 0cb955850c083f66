"""``wsi-infer --check-precision``: what a runtime/precision changes on a slide, against torch fp32.

Both runs are made in memory (:func:`wsi_toolkit.analysis.analyse_slide`, nothing written): the run
as configured and the reference, the package's torch model in fp32 with the same grid and
settings. The report gives max and mean |dp| of P(tumour) over the patches, the label flips at the
run's threshold, and the change of the tumour area, the slide score and the region count.

It sits above :mod:`wsi_toolkit.analysis` (it runs analyses), not in :mod:`wsi_toolkit.runtime`
(which the analysis imports); it was ``wsi_toolkit.runtime.check``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsi_toolkit.analysis import RunConfig, SlideAnalysis, analyse_slide
from wsi_toolkit.runtime import compare_probabilities

if TYPE_CHECKING:
    from wsi_toolkit.model_package import ModelPackage

__all__ = ["check_precision", "compare_analyses"]


def compare_analyses(reference: SlideAnalysis, other: SlideAnalysis) -> dict[str, Any]:
    """``other`` against ``reference`` (the same slide and grid): probabilities, flips, area."""
    def ran(a: SlideAnalysis) -> dict[str, Any]:
        return {k: a.runtime.get(k) for k in ("runtime", "precision", "fallback") if a.runtime.get(k) is not None}

    threshold = other.settings.threshold
    return {
        "slide": str(other.slide_path),
        "run": ran(other), "reference": ran(reference),
        "patches": compare_probabilities(reference.p_tumor, other.p_tumor, threshold=threshold),
        "tumor_area_mm2": {"reference": reference.tumor_area_mm2, "run": other.tumor_area_mm2,
                           "change": other.tumor_area_mm2 - reference.tumor_area_mm2},
        "slide_score": {"reference": reference.slide_score, "run": other.slide_score,
                        "change": other.slide_score - reference.slide_score},
        "n_regions": {"reference": len(reference.regions), "run": len(other.regions)},
        "seconds_model": {"reference": reference.timings.get("seconds_model"),
                          "run": other.timings.get("seconds_model")},
    }


def check_precision(slide: str | Path, package: ModelPackage, settings: RunConfig) -> dict[str, Any]:
    """Analyse ``slide`` with ``settings`` and with torch fp32; :func:`compare_analyses` of the two."""
    t0 = time.perf_counter()
    run = analyse_slide(slide, package, settings)
    ref_settings = replace(settings, inference=replace(settings.inference, runtime="torch", precision="fp32",
                                                       calibration=None))
    reference = analyse_slide(slide, package, ref_settings)
    return {**compare_analyses(reference, run), "seconds": round(time.perf_counter() - t0, 3)}
