"""The ``wsi-eval`` figures: the FROC curve and the slide-level ROC curve, as PNGs written atomically."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from wsi_toolkit import plots
from wsi_toolkit.evaluate.scoring import TARGET_FPS, FrocResult, slide_auc

__all__ = ["plot_froc", "plot_roc"]


def plot_froc(result: FrocResult, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Write the FROC curve (sensitivity vs average FPs per slide) as a PNG, atomically."""
    fig = plots.new_figure((6, 4.5))
    ax = fig.add_subplot()
    x_max = max(8.0, float(result.avg_fps.max()) if result.avg_fps.size else 8.0) * 1.25
    if result.n_lesions:
        # Increasing-FP order, drawn as the score rule reads it: a target t in (fps[i-1], fps[i]]
        # gets sens[i] ("pre" steps); beyond the last point the sensitivity stays.
        fps, sens = result.avg_fps[::-1], result.sensitivity[::-1]
        ax.step(np.append(fps, x_max), np.append(sens, sens[-1]), where="pre", color="black", lw=1.5,
                label="FROC curve")
        ax.plot(result.targets, result.sensitivities, "o", color="tab:red",
                label=f"score points (FROC {result.score:.3f})")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no lesion to find", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_xlim(0, x_max)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks([0.0, *TARGET_FPS])
    ax.set_xticklabels(["0", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_xlabel("average false positives per slide")
    ax.set_ylabel("lesion sensitivity")
    ax.set_title(title or f"FROC: {result.n_slides} slides, {result.n_lesions} lesions", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_roc(scores: Sequence[float], truths: Sequence[bool], path: str | os.PathLike[str], *,
             title: str = "") -> None:
    """Write the slide-level ROC curve as a PNG, atomically (a note instead when one class is absent)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truths, dtype=bool)
    slide_auc(s, t)  # the checks: 1-D, equal length, finite scores
    plots.plot_roc(s, t, path,
                   title=title or f"slide-level ROC: {int(t.sum())} tumour, {int((~t).sum())} normal",
                   xlabel="false positive rate (normal slides)", ylabel="true positive rate (tumour slides)",
                   one_class_note="needs tumour and normal slides", auc_digits=3, figsize=(4.8, 4.8))
