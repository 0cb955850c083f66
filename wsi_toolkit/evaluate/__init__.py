"""Camelyon16 lesion-level FROC and slide-level ROC AUC (``wsi-eval``).

Pure array functions (:func:`evaluation_mask`, :func:`detections_from_heatmap`, :func:`match_detections`,
:func:`froc`, :func:`slide_auc`) and the file edge :func:`evaluate_results`, which reads ``wsi-infer``
results and annotations and writes tables and plots. The rules, where they follow which challenge code
and where they deviate: ``docs/camelyon16.md``.

Example
-------
>>> import numpy as np
>>> import shapely
>>> mask = evaluation_mask(shapely.box(0, 0, 3200, 3200), l0_size=(6400, 6400), l0_mpp=0.25)
>>> mask.n_labels, sorted(mask.itc_labels), mask.mpp
(1, [], 8.0)
>>> det = np.array([[0.9, 1600, 1600], [0.8, 6000, 6000]])    # (prob, x, y), level-0 px
>>> result = froc([(det, mask)])
>>> float(result.score), result.n_fp
(1.0, 1)
"""

from __future__ import annotations

from wsi_toolkit.errors import DetectionFileError

# MAX_DETECTION_CSV_BYTES and SLIDE_COLUMNS are not in __all__ but stay importable from here (redundant aliases).
from wsi_toolkit.evaluate.detections import (
    MAX_DETECTION_CSV_BYTES as MAX_DETECTION_CSV_BYTES,
)
from wsi_toolkit.evaluate.detections import (
    detections_from_heatmap,
    read_detections_csv,
    write_detections_csv,
)
from wsi_toolkit.evaluate.figures import plot_froc, plot_roc
from wsi_toolkit.evaluate.folder import (
    SLIDE_COLUMNS as SLIDE_COLUMNS,
)
from wsi_toolkit.evaluate.folder import (
    EvalConfig,
    EvalReport,
    SlideEval,
    evaluate_results,
    format_summary,
)
from wsi_toolkit.evaluate.mask import (
    DILATION_UM,
    EVAL_LEVEL,
    ITC_MAJOR_AXIS_UM,
    EvaluationMask,
    evaluation_mask,
    evaluation_mask_from_tumor,
)
from wsi_toolkit.evaluate.scoring import (
    SLIDE_SCORES,
    TARGET_FPS,
    FrocResult,
    SlideMatch,
    froc,
    froc_curve,
    match_detections,
    sensitivities_at,
    slide_auc,
)
from wsi_toolkit.evaluate.truth import CAMELYON16_L0_MPP, read_mask_tiff

__all__ = [
    "EVAL_LEVEL",
    "DILATION_UM",
    "ITC_MAJOR_AXIS_UM",
    "TARGET_FPS",
    "CAMELYON16_L0_MPP",
    "SLIDE_SCORES",
    "DetectionFileError",
    "EvaluationMask",
    "SlideMatch",
    "FrocResult",
    "EvalConfig",
    "SlideEval",
    "EvalReport",
    "evaluation_mask",
    "evaluation_mask_from_tumor",
    "detections_from_heatmap",
    "match_detections",
    "froc_curve",
    "froc",
    "sensitivities_at",
    "slide_auc",
    "read_detections_csv",
    "write_detections_csv",
    "read_mask_tiff",
    "plot_froc",
    "plot_roc",
    "evaluate_results",
    "format_summary",
]
