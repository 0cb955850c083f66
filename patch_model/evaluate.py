"""Old import path of :mod:`patch_model.patch_eval` (``pcam-eval``), kept for existing imports."""

from __future__ import annotations

from patch_model.patch_eval import (
    LEAKY_NOTE,
    EvalResult,
    binary_metrics,
    dihedral_views,
    evaluate_package,
    plot_confusion_matrix,
    plot_roc,
)

__all__ = ["LEAKY_NOTE", "EvalResult", "binary_metrics", "dihedral_views", "evaluate_package",
           "plot_confusion_matrix", "plot_roc"]
