"""The Camelyon16 evaluation mask: tumour dilated by 37.5 um, holes filled, 8-connected lesions, ITCs marked.

Rules 1 and 2 of ``docs/camelyon16.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.limits import check_int, check_number

__all__ = ["EVAL_LEVEL", "DILATION_UM", "ITC_MAJOR_AXIS_UM", "EvaluationMask", "evaluation_mask",
           "evaluation_mask_from_tumor"]

#: Pyramid level of the evaluation mask: one pixel = 2**5 = 32 level-0 pixels.
EVAL_LEVEL = 5
#: Tumour within this distance (um) of each other is one lesion: the mask is dilated by half of it.
DILATION_UM = 75.0
#: Lesions (after the dilation) whose major axis is below this (um) are isolated tumour cells.
ITC_MAJOR_AXIS_UM = 275.0

@dataclass(frozen=True, eq=False)
class EvaluationMask:
    """The Camelyon16 evaluation mask of one tumour slide.

    Attributes
    ----------
    labels : ndarray, int32, (rows, cols)
        0 = no tumour; ``1..n_labels`` = lesions (tumour dilated by 37.5 um, holes filled,
        8-connected). Pixel ``[r, c]`` covers level-0 ``[c*k, (c+1)*k) x [r*k, (r+1)*k)`` with
        ``k = l0_per_px``. Read-only.
    itc_labels : frozenset of int
        Labels that are isolated tumour cells (major axis < 275 um): ignored.
    mpp : float
        um per evaluation pixel (``l0_per_px * l0_mpp``).
    l0_per_px : float
        Level-0 px per evaluation pixel (``2**level``, 32).
    """

    labels: np.ndarray = field(repr=False)
    itc_labels: frozenset[int]
    mpp: float
    l0_per_px: float = float(2**EVAL_LEVEL)

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int32)
        if labels.ndim != 2:
            raise ConfigError(f"EvaluationMask.labels must be 2-D (rows, cols); got shape {labels.shape}")
        if labels.size and labels.min() < 0:
            raise ConfigError("EvaluationMask.labels must be >= 0 (0 = no tumour)")
        for name in ("mpp", "l0_per_px"):
            object.__setattr__(self, name, check_number(getattr(self, name), f"EvaluationMask.{name}", positive=True))
        n = int(labels.max()) if labels.size else 0
        itc = frozenset(int(v) for v in self.itc_labels)
        bad = sorted(v for v in itc if not 1 <= v <= n)
        if bad:
            raise ConfigError(f"EvaluationMask.itc_labels {bad} are not labels of the mask (1..{n})")
        labels.flags.writeable = False
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "itc_labels", itc)

    @property
    def n_labels(self) -> int:
        """Number of labelled regions, ITCs included."""
        return int(self.labels.max()) if self.labels.size else 0

    @property
    def lesion_labels(self) -> np.ndarray:
        """The labels that count (not ITC), increasing, int64."""
        return np.array([v for v in range(1, self.n_labels + 1) if v not in self.itc_labels], dtype=np.int64)

    def label_at(self, l0_xy: np.ndarray) -> np.ndarray:
        """Label under each level-0 point ``(x, y)`` (shape (N, 2)); 0 outside the mask."""
        xy = np.asarray(l0_xy, dtype=np.float64).reshape(-1, 2)
        col = np.floor(xy[:, 0] / self.l0_per_px)
        row = np.floor(xy[:, 1] / self.l0_per_px)
        h, w = self.labels.shape
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.zeros(len(xy), dtype=np.int64)
        out[inside] = self.labels[row[inside].astype(np.int64), col[inside].astype(np.int64)]
        return out


def evaluation_mask_from_tumor(tumor_rc: np.ndarray, *, eval_mpp: float,
                                l0_per_px: float = float(2**EVAL_LEVEL)) -> EvaluationMask:
    """The evaluation mask of a boolean tumour mask already at the evaluation resolution.

    Parameters
    ----------
    tumor_rc : ndarray, bool, (rows, cols)
        True = tumour, one pixel = ``eval_mpp`` um.
    eval_mpp : float
        um per pixel of ``tumor_rc`` (``32 * l0_mpp`` for the Camelyon16 level 5).
    l0_per_px : float
        Level-0 px per pixel (32), to map detections.

    Returns
    -------
    EvaluationMask
        Distance-transform dilation by 37.5 um (strict ``<``), holes filled, 8-connected labels;
        ITC labels = major axis < 275 um (rules 1 and 2 of ``docs/camelyon16.md``).
    """
    from scipy import ndimage
    from skimage.measure import label, regionprops

    tumor = np.asarray(tumor_rc).astype(bool)
    if tumor.ndim != 2:
        raise ConfigError(f"tumor_rc must be a 2-D mask (rows, cols); got shape {tumor.shape}")
    eval_mpp = check_number(eval_mpp, "eval_mpp", positive=True, unit="um/px")
    labels = np.zeros(tumor.shape, np.int32)
    if not tumor.any():
        return EvaluationMask(labels=labels, itc_labels=frozenset(), mpp=eval_mpp, l0_per_px=l0_per_px)
    join_px = (DILATION_UM / 2.0) / eval_mpp
    # Work in the tumour's bounding box plus a margin wider than the dilation: the crop's border is
    # then background (or the image border), so distances, filled holes and labels are the same as
    # on the whole image.
    rows, cols = np.nonzero(tumor)
    margin = int(math.ceil(join_px)) + 2
    r0, r1 = max(rows.min() - margin, 0), min(rows.max() + margin + 1, tumor.shape[0])
    c0, c1 = max(cols.min() - margin, 0), min(cols.max() + margin + 1, tumor.shape[1])
    crop = tumor[r0:r1, c0:c1]
    distance = ndimage.distance_transform_edt(~crop)
    filled = ndimage.binary_fill_holes(distance < join_px)
    crop_labels = label(filled, connectivity=2)
    labels[r0:r1, c0:c1] = crop_labels
    itc_px = ITC_MAJOR_AXIS_UM / eval_mpp
    itc = frozenset(int(p.label) for p in regionprops(crop_labels) if p.axis_major_length < itc_px)
    return EvaluationMask(labels=labels, itc_labels=itc, mpp=eval_mpp, l0_per_px=l0_per_px)


def evaluation_mask(tumor_l0: Any, *, l0_size: tuple[int, int], l0_mpp: float,
                    level: int = EVAL_LEVEL) -> EvaluationMask:
    """The Camelyon16 evaluation mask of tumour polygons.

    Parameters
    ----------
    tumor_l0 : shapely geometry or iterable of shapely polygons
        The tumour region in level-0 px ``(x, y)`` (e.g.
        :func:`wsi_toolkit.annotations.tumor_region` of an ASAP XML); holes respected.
    l0_size : (int, int)
        Slide level-0 ``(width, height)`` px.
    l0_mpp : float
        The slide's level-0 um/px (not the challenge's hard-coded 0.243).
    level : int
        Evaluation level: one pixel = ``2**level`` level-0 px (5 in Camelyon16).

    Returns
    -------
    EvaluationMask
        ``labels`` of shape ``(ceil(h / 2**level), ceil(w / 2**level))``, ``mpp = 2**level * l0_mpp``.
    """
    import shapely

    from wsi_toolkit.annotations import rasterize

    level = check_int(level, "level", minimum=0, bounds=(0, 12))
    if not isinstance(tumor_l0, shapely.Geometry):
        parts = list(tumor_l0)
        tumor_l0 = shapely.union_all(parts) if parts else shapely.Polygon()
    l0_per_px = float(2**int(level))
    eval_mpp = l0_per_px * float(l0_mpp)
    tumor_rc = rasterize(tumor_l0, l0_size=l0_size, l0_mpp=l0_mpp, mask_mpp=eval_mpp)
    return evaluation_mask_from_tumor(tumor_rc, eval_mpp=eval_mpp, l0_per_px=l0_per_px)
