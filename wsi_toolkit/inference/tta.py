"""Test-time augmentation (TTA): each patch predicted in several orientations, the views averaged.

Views are made on the uint8 patches ``(n, p, p, 3)`` (rows, cols, channels) before the
preprocessing and the model, so every runtime (torch CPU/CUDA, OpenVINO fp32/bf16/INT8) gets them
the same way. Modes (registry :data:`TTA_MODES`):

- ``"none"``: the patch as read (one view; outputs as without TTA).
- ``"flips"``: the 4 views of the flip group: identity, horizontal flip (columns reversed),
  vertical flip (rows reversed), both (= rotation by 180 degrees).
- ``"dihedral"``: the 8 views of the square's symmetry group (D4): rotations by 0, 90, 180, 270
  degrees, and the same of the horizontally flipped patch.

A batch of ``b`` patches becomes ``len(views) * b`` patches, view-major (all patches in view 0,
then view 1, ...). :func:`combine_views` turns the probabilities of such a batch back into one
row per patch: the mean over the views (the heatmap's probability) and their population standard
deviation (the spread of the views; the uncertainty map). A model that is invariant under the
views gives the plain probabilities and a spread of 0 (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

__all__ = ["TtaMode", "TTA_MODES", "n_views", "make_views", "combine_views"]

TtaMode = Literal["none", "flips", "dihedral"]

_H, _W = 1, 2  # row and column axes of a (n, p, p, 3) uint8 batch

View = Callable[[torch.Tensor], torch.Tensor]


def _rot(k: int, flip: bool = False) -> View:
    def view(x: torch.Tensor) -> torch.Tensor:
        y = torch.flip(x, dims=(_W,)) if flip else x
        return torch.rot90(y, k, dims=(_H, _W)) if k else y
    return view


def _flip(dims: tuple[int, ...]) -> View:
    return lambda x: torch.flip(x, dims=dims) if dims else x


#: TTA mode -> its views (functions of a uint8 ``(n, p, p, 3)`` batch); the first is the identity.
TTA_MODES: dict[str, tuple[View, ...]] = {
    "none": (_flip(()),),
    "flips": (_flip(()), _flip((_W,)), _flip((_H,)), _flip((_H, _W))),
    "dihedral": tuple(_rot(k) for k in range(4)) + tuple(_rot(k, flip=True) for k in range(4)),
}


def n_views(mode: str) -> int:
    """How many views ``mode`` predicts per patch (1, 4 or 8)."""
    return len(TTA_MODES[mode])


def make_views(patches_u8: torch.Tensor, mode: str) -> torch.Tensor:
    """The views of a uint8 batch ``(b, p, p, 3)``: ``(n_views * b, p, p, 3)``, view-major; the batch
    itself (no copy) for ``"none"``."""
    views = TTA_MODES[mode]
    if len(views) == 1:
        return patches_u8
    return torch.cat([v(patches_u8) for v in views])


def combine_views(probs: np.ndarray, views: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(views * b, C)`` probabilities of a view-major batch -> mean ``(b, C)`` and standard deviation
    over the views ``(b, C)`` (population, ddof 0), float32; ``(probs, None)`` for one view."""
    if views == 1:
        return probs, None
    stacked = np.asarray(probs, np.float64).reshape(views, -1, probs.shape[-1])
    return stacked.mean(axis=0).astype(np.float32), stacked.std(axis=0).astype(np.float32)
