"""Stitch per-patch probabilities into a heatmap aligned to the slide.

The heatmap is the patch grid's cell image (see :mod:`wsi_toolkit.tiling`): heatmap pixel
``[r, c]`` is grid cell ``(r, c)``, which covers level-0
``[c * cell_l0, (c + 1) * cell_l0) x [r * cell_l0, (r + 1) * cell_l0)``; the origin (0, 0) is the
slide's top-left corner. One heatmap pixel is ``cell_l0`` level-0 pixels, i.e.
``mpp = cell_l0 * l0_mpp`` um (``stride_px * spacing_um_px``: 31.104 um for PCam at stride 32).

Merge modes (registry :data:`MERGE_MODES`)
------------------------------------------
- ``"centre"``: each patch paints only its centre region, which is its own cell. For PCam
  (label = tumour in the centre 32x32 px) at stride 32 this is dense, seamless and says exactly
  what the model was trained to answer. Kept cells get their patch's probability.
- ``"mean"``: each patch paints its whole footprint (the ``patch_px`` square, top-left
  :meth:`PatchGrid.patch_l0_xy`); overlapping paints are averaged. A cell is painted by a patch
  when the cell's centre lies inside the patch's half-open square ``[x, x + patch_l0)``. In model
  pixels the patch of cell ``c`` spans ``[c*S - (P - S)/2, c*S + (P + S)/2)`` and cell ``j``'s
  centre is ``(j + 0.5) * S``, so the painted offsets are the integers
  ``d = j - c`` with ``-P / (2S) <= d < P / (2S)`` (P = patch_px, S = stride_px), computed in
  exact integer arithmetic: 3x3 cells for PCam (96 / 32), only the own cell when P == S.
  Cells painted by no patch stay 0 and not predicted; cells painted by a patch of a neighbouring
  kept cell are predicted even if not kept themselves.

Outside the predicted cells (outside tissue) the probability is 0; :attr:`Heatmap.predicted`
tells "no prediction" from "predicted 0".

Example
-------
>>> from wsi_toolkit.tiling import make_grid
>>> grid = make_grid(l0_size=(512, 384), l0_mpp=0.243)      # 3 x 4 cells of 128 l0 px
>>> hm = stitch(grid, np.linspace(0, 1, len(grid)))
>>> hm.prob.shape, round(hm.mpp, 3), float(hm.prob[2, 3])
((3, 4), 31.104, 1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.limits import check_number
from wsi_toolkit.tiling import PatchGrid

__all__ = ["MergeMode", "MERGE_MODES", "Heatmap", "stitch", "paint_cells", "uncertainty_summary", "UNCERTAIN_STD",
           "UNCERTAIN_MARGIN"]

MergeMode = Literal["centre", "mean"]


@dataclass(frozen=True, eq=False)
class Heatmap:
    """A tumour-probability heatmap on the patch grid's cells.

    Attributes
    ----------
    prob : ndarray, float32, (rows, cols)
        Probability in [0, 1] per cell (= ``grid.shape_rc``); 0 outside predicted cells
        (outside tissue the probability is 0). Read-only.
    predicted : ndarray, bool, (rows, cols)
        Cells that received a prediction. Read-only.
    cell_l0 : float
        Level-0 px per heatmap px (``grid.cell_l0``). Heatmap pixel ``[r, c]`` covers level-0
        ``[c*cell_l0, (c+1)*cell_l0) x [r*cell_l0, (r+1)*cell_l0)``; origin (0, 0) = slide top-left.
    l0_mpp : float
        um per level-0 px of the slide.
    merge : str
        The merge mode that made it (``"centre"`` or ``"mean"``).
    """

    prob: np.ndarray = field(repr=False)
    predicted: np.ndarray = field(repr=False)
    cell_l0: float
    l0_mpp: float
    merge: str

    def __post_init__(self) -> None:
        prob = np.array(self.prob, dtype=np.float32)  # a private copy, then frozen
        predicted = np.array(self.predicted, dtype=bool)
        if prob.ndim != 2:
            raise ConfigError(f"Heatmap.prob must be 2-D (rows, cols); got shape {prob.shape}")
        if predicted.shape != prob.shape:
            raise ConfigError(
                f"Heatmap.predicted shape {predicted.shape} differs from prob shape {prob.shape}"
            )
        for name in ("cell_l0", "l0_mpp"):
            object.__setattr__(self, name, check_number(getattr(self, name), f"Heatmap.{name}", positive=True))
        prob.flags.writeable = False
        predicted.flags.writeable = False
        object.__setattr__(self, "prob", prob)
        object.__setattr__(self, "predicted", predicted)

    @property
    def shape_rc(self) -> tuple[int, int]:
        """(rows, cols) of the heatmap."""
        return (int(self.prob.shape[0]), int(self.prob.shape[1]))

    @property
    def mpp(self) -> float:
        """um per heatmap pixel: ``cell_l0 * l0_mpp`` (31.104 for PCam at stride 32)."""
        return self.cell_l0 * self.l0_mpp

    def geometry(self) -> dict:
        """JSON-ready description of how the heatmap sits on the slide."""
        return {
            "shape_rc": list(self.shape_rc),
            "cell_l0": self.cell_l0,
            "mpp": self.mpp,
            "origin_l0": [0, 0],
            "merge": self.merge,
            "l0_mpp": self.l0_mpp,
        }


def _centre_offsets(patch_px: int, stride_px: int) -> range:
    """The centre merge: a patch paints only its own cell."""
    return range(0, 1)


def _mean_offsets(patch_px: int, stride_px: int) -> range:
    """The mean merge: integer cell offsets d with ``-P/(2S) <= d < P/(2S)`` (exact integer arithmetic)."""
    two_s = 2 * int(stride_px)
    d_min = -(int(patch_px) // two_s)  # ceil(-P / 2S)
    d_max = -((-int(patch_px)) // two_s) - 1  # ceil(P / 2S) - 1
    return range(d_min, d_max + 1)


#: Merge-mode registry: name -> function(patch_px, stride_px) -> the cell offsets (along rows and
#: columns alike) a patch paints around its own cell (module docstring); :func:`paint_cells` paints them.
MERGE_MODES: dict[str, Callable[[int, int], range]] = {
    "centre": _centre_offsets,
    "mean": _mean_offsets,
}


def paint_cells(cells_rc: np.ndarray, values: np.ndarray, shape_rc: tuple[int, int], *, merge: MergeMode,
                patch_px: int, stride_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint one value per patch onto the cells ``merge`` gives it: the one painter of heatmaps.

    :func:`stitch` averages with it; a reader of a results folder (``wsi-view``) finds the predicted
    cells with it from ``tiles.csv``, so both agree by construction.

    Parameters
    ----------
    cells_rc : array-like, int, (N, 2)
        Each patch's own cell ``[row, col]`` (``PatchGrid.grid_rc``).
    values : array-like, float, (N,)
        What each patch paints (its probability; ones to count).
    shape_rc : (rows, cols)
        The heatmap's shape (``PatchGrid.shape_rc``); paint outside it is dropped.
    merge, patch_px, stride_px
        The merge mode and the grid's patch size and stride (model px) it paints by.

    Returns
    -------
    total : ndarray, float64, (rows, cols)
        Sum of the values painted on each cell.
    count : ndarray, int64, (rows, cols)
        Number of patches painting each cell (0: not predicted).
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge must be one of {sorted(MERGE_MODES)}; got {merge!r}")
    n_rows, n_cols = (int(v) for v in shape_rc)
    total = np.zeros((n_rows, n_cols), np.float64)
    count = np.zeros((n_rows, n_cols), np.int64)
    cells = np.asarray(cells_rc, dtype=np.int64).reshape(-1, 2)
    vals = np.asarray(values, dtype=np.float64)
    offsets = MERGE_MODES[merge](patch_px, stride_px)
    rr, cc = cells[:, 0], cells[:, 1]
    for dr in offsets:
        r = rr + dr
        ok_r = (r >= 0) & (r < n_rows)
        for dc in offsets:
            c = cc + dc
            ok = ok_r & (c >= 0) & (c < n_cols)
            np.add.at(total, (r[ok], c[ok]), vals[ok])
            np.add.at(count, (r[ok], c[ok]), 1)
    return total, count


def stitch(grid: PatchGrid, probs: np.ndarray, *, merge: MergeMode = "centre") -> Heatmap:
    """Stitch one probability per patch into a :class:`Heatmap` of ``grid.shape_rc``.

    Parameters
    ----------
    grid : PatchGrid
        The grid the probabilities were predicted on.
    probs : array-like, float, (len(grid),)
        Tumour probability of each kept cell's patch, in grid order; finite, in [0, 1].
    merge : {"centre", "mean"}
        How patches paint cells (module docstring; :func:`paint_cells`). Memory is O(grid cells); "mean"
        loops only over the few cell offsets a patch covers (3x3 for PCam), vectorised over patches.

    Raises
    ------
    ConfigError
        Unknown merge mode, or ``probs`` of the wrong shape, not finite or outside [0, 1].
    """
    if merge not in MERGE_MODES:
        raise ConfigError(f"merge must be one of {sorted(MERGE_MODES)}; got {merge!r}")
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"probs must be an array of numbers; got {type(probs).__name__}") from None
    if p.shape != (len(grid),):
        raise ConfigError(
            f"probs must have shape ({len(grid)},), one probability per kept grid cell; got {p.shape}"
        )
    if p.size:
        if not np.all(np.isfinite(p)):
            bad = int(np.flatnonzero(~np.isfinite(p))[0])
            raise ConfigError(f"probs must be finite; probs[{bad}] = {p[bad]!r}")
        if p.min() < 0 or p.max() > 1:
            bad = int(np.flatnonzero((p < 0) | (p > 1))[0])
            raise ConfigError(
                f"probs must be probabilities in [0, 1]; probs[{bad}] = {p[bad]!r} "
                "(apply softmax/sigmoid to the model's logits first)"
            )
    total, count = paint_cells(grid.grid_rc, p, grid.shape_rc, merge=merge, patch_px=grid.config.patch_px,
                               stride_px=grid.config.stride_px)
    predicted = count > 0
    prob = np.zeros(grid.shape_rc, np.float64)
    np.divide(total, count, out=prob, where=predicted)
    return Heatmap(prob=prob.astype(np.float32), predicted=predicted, cell_l0=grid.cell_l0,
                   l0_mpp=grid.l0_mpp, merge=merge)


#: A predicted cell is *uncertain* when the spread of its test-time-augmentation views (standard
#: deviation of the tumour probability) exceeds this ...
UNCERTAIN_STD = 0.1
#: ... or when its probability is within this of the threshold.
UNCERTAIN_MARGIN = 0.1


def uncertainty_summary(heatmap: Heatmap, uncertainty: Heatmap, *, threshold: float) -> dict:
    """Area of the predicted cells that are confidently tumour, confidently normal or uncertain.

    A predicted cell is uncertain when ``std > UNCERTAIN_STD`` or ``|p - threshold| <
    UNCERTAIN_MARGIN`` (``std``: ``uncertainty.prob``, the views' standard deviation; ``p``:
    ``heatmap.prob``); otherwise confidently tumour when ``p >= threshold``, confidently normal when
    ``p < threshold``. Areas in mm^2 (cells x ``heatmap.mpp**2``); the three add up to the predicted
    area. Also the mean and maximum ``std`` over the predicted cells.
    """
    if uncertainty.shape_rc != heatmap.shape_rc or not np.array_equal(uncertainty.predicted, heatmap.predicted):
        raise ConfigError(f"uncertainty map {uncertainty.shape_rc} does not cover the heatmap's predicted cells "
                          f"{heatmap.shape_rc}; stitch both from the same grid and merge")
    check_number(threshold, "threshold", bounds=(0.0, 1.0))
    pred = heatmap.predicted
    p, std = heatmap.prob[pred].astype(np.float64), uncertainty.prob[pred].astype(np.float64)
    uncertain = (std > UNCERTAIN_STD) | (np.abs(p - threshold) < UNCERTAIN_MARGIN)
    cell_mm2 = heatmap.mpp**2 / 1e6
    return {
        "rule": f"uncertain: std > {UNCERTAIN_STD:g} or |p - threshold| < {UNCERTAIN_MARGIN:g}; else tumor "
                "(p >= threshold) or normal",
        "std_above": UNCERTAIN_STD, "margin": UNCERTAIN_MARGIN, "threshold": float(threshold),
        "confident_tumor_mm2": float(np.sum(~uncertain & (p >= threshold)) * cell_mm2),
        "confident_normal_mm2": float(np.sum(~uncertain & (p < threshold)) * cell_mm2),
        "uncertain_mm2": float(np.sum(uncertain) * cell_mm2),
        "mean_std": float(std.mean()) if std.size else 0.0,
        "max_std": float(std.max()) if std.size else 0.0,
    }
