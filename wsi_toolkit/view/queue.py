"""Where a reviewer should look first: areas of a heatmap ranked by how unsure the model was.

:func:`review_queue` is pure (heatmaps in, a list out). The cells it ranks are the predicted cells

- whose uncertainty (the ``wsi-infer --tta`` views' standard deviation, ``uncertainty.tif``) is
  above ``std_above`` (0.1, :data:`wsi_toolkit.heatmap.UNCERTAIN_STD`, the rule of ``run.json``'s
  uncertainty summary), when the run has an uncertainty map and any cell is that uncertain;
- else whose tumour probability is within ``margin`` (0.1, :data:`~wsi_toolkit.heatmap.UNCERTAIN_MARGIN`)
  of the threshold the regions were made with.

Those cells are grouped into 8-connected areas; an area's score is the sum over its cells of the
standard deviation (first rule) or of the closeness to the threshold, ``1 - |p - threshold| / margin``
in (0, 1] (second rule): how much uncertain tissue a look at it settles, so a large uncertain area
comes before an isolated cell (ranked by the mean instead, on CMU-1-Small-Region with a ``--tta
flips`` run, two single cells came before areas of 115 and 92 cells). Areas are ranked by score,
then size (larger first), then position (top, left), so the order is the same on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from wsi_toolkit.heatmap import UNCERTAIN_MARGIN, UNCERTAIN_STD, Heatmap
from wsi_toolkit.limits import check_number

__all__ = ["QueueItem", "review_queue"]


@dataclass(frozen=True)
class QueueItem:
    """One area to review: ``bbox_l0`` (x0, y0, x1, y1) in level-0 px (its cells' squares), ``score``
    (higher: review sooner; a sum over cells, see the module docstring), ``reason`` in words, ``rule``
    (``"uncertainty"`` or ``"threshold"``), ``n_cells``, ``area_mm2``, ``mean_prob`` and, with an
    uncertainty map, ``mean_std``."""

    bbox_l0: tuple[float, float, float, float]
    score: float
    reason: str
    rule: str
    n_cells: int
    area_mm2: float
    mean_prob: float
    mean_std: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"bbox_l0": list(self.bbox_l0), "score": self.score, "reason": self.reason, "rule": self.rule,
                "n_cells": self.n_cells, "area_mm2": self.area_mm2, "mean_prob": self.mean_prob,
                "mean_std": self.mean_std}


def review_queue(heatmap: Heatmap, *, threshold: float, uncertainty: Heatmap | None = None, limit: int = 100,
                 std_above: float = UNCERTAIN_STD, margin: float = UNCERTAIN_MARGIN) -> list[QueueItem]:
    """The areas of ``heatmap`` worth reviewing first, best first, at most ``limit`` (module docstring).

    ``uncertainty``: the views' standard deviation on the same cells (``Heatmap.prob`` holds it), or None.
    """
    check_number(threshold, "threshold", bounds=(0.0, 1.0))
    check_number(margin, "margin", positive=True)
    if uncertainty is not None and uncertainty.shape_rc != heatmap.shape_rc:
        raise ValueError(f"uncertainty map {uncertainty.shape_rc} and heatmap {heatmap.shape_rc} differ in shape")
    p = heatmap.prob.astype(np.float64)
    pred = heatmap.predicted
    std = uncertainty.prob.astype(np.float64) if uncertainty is not None else None
    rule = "threshold"
    if std is not None and (pred & (std > std_above)).any():
        mask, rule = pred & (std > std_above), "uncertainty"
    else:
        mask = pred & (np.abs(p - threshold) < margin)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    mean_p = np.asarray(ndimage.mean(p, labels, idx), dtype=np.float64)
    mean_std = np.asarray(ndimage.mean(std, labels, idx), dtype=np.float64) if std is not None else None
    cell, cell_mm2 = heatmap.cell_l0, heatmap.mpp**2 / 1e6
    if rule == "uncertainty" and mean_std is not None:
        scores = mean_std * counts
        reasons = [f"mean uncertainty {v:.2f} over {n * cell_mm2:.4f} mm² (std of the TTA views > {std_above:g})"
                   for v, n in zip(mean_std, counts, strict=True)]
    else:
        closeness = np.asarray(ndimage.mean(np.abs(p - threshold), labels, idx), dtype=np.float64)
        scores = (1.0 - closeness / margin) * counts
        reasons = [f"p within {margin:g} of the threshold {threshold:g} over {n * cell_mm2:.4f} mm² (mean p {v:.2f})"
                   for v, n in zip(mean_p, counts, strict=True)]
    items = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        r0, r1, c0, c1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        items.append(QueueItem(bbox_l0=(c0 * cell, r0 * cell, c1 * cell, r1 * cell), score=round(float(scores[k]), 6),
                               reason=reasons[k], rule=rule, n_cells=int(counts[k]),
                               area_mm2=float(counts[k] * cell_mm2), mean_prob=float(mean_p[k]),
                               mean_std=None if mean_std is None else float(mean_std[k])))
    items.sort(key=lambda it: (-it.score, -it.n_cells, it.bbox_l0[1], it.bbox_l0[0]))
    return items[:limit]
