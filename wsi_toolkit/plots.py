"""Shared figure helpers: a matplotlib figure on the Agg canvas, an atomic save, a ROC plot.

matplotlib's object API only (no pyplot, no global backend): a figure made here is not registered
anywhere, so saving it and dropping it frees it. Used by ``wsi-eval`` (:mod:`wsi_toolkit.evaluate`),
``pcam-eval`` and ``pcam-train`` (:mod:`patch_model`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_toolkit.atomic import atomic_path

__all__ = ["new_figure", "save_figure", "plot_roc"]

#: Resolution of every PNG the toolkit writes.
DPI = 110


def new_figure(figsize: tuple[float, float], *,
               layout: Literal["constrained", "compressed", "tight"] | None = None) -> Any:
    """A :class:`matplotlib.figure.Figure` of ``figsize`` inches with an Agg canvas attached.

    ``layout``: matplotlib's layout engine (``"constrained"``, ``"tight"``) or None.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | os.PathLike[str], *, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, then clear it (its memory is freed). Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    fig.clear()
    return path


def plot_roc(scores: Sequence[float] | np.ndarray, truths: Sequence[bool] | np.ndarray,
             path: str | os.PathLike[str], *, title: str = "", xlabel: str = "false positive rate",
             ylabel: str = "true positive rate", one_class_note: str = "needs both classes: no ROC",
             auc_digits: int = 3, figsize: tuple[float, float] = (4.8, 4.8)) -> Path:
    """Write the ROC curve of ``scores`` against boolean ``truths`` as a PNG, atomically.

    The legend gives the AUC with ``auc_digits`` decimals; when only one class occurs the figure
    shows ``one_class_note`` instead of a curve. Returns the path.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    t = np.asarray(truths, dtype=bool).reshape(-1)
    fig = new_figure(figsize)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    if len(t) and 0 < t.sum() < len(t):
        fpr, tpr, _ = roc_curve(t, s)
        ax.plot(fpr, tpr, color="black", lw=1.5, label=f"AUC {roc_auc_score(t, s):.{auc_digits}f}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, one_class_note, ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "ROC", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
