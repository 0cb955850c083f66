"""Camelyon16 lesion-level FROC and slide-level ROC AUC.

The core is pure array functions (:func:`evaluation_mask`, :func:`detections_from_heatmap`,
:func:`match_detections`, :func:`froc`, :func:`slide_auc`); :func:`evaluate_results` is the file
edge behind ``wsi-eval`` (reads ``wsi-infer`` results and annotations, writes tables and plots).

The Camelyon16 rules, as the challenge's own code applies them
--------------------------------------------------------------
Two pieces of official code exist: ``Evaluation_FROC.py`` of the challenge repository
(computationalpathologygroup/Camelyon16, 2016; curve only, no score) and ``evaluate.py`` shipped
with the CAMELYON16 data release (adds the six-point score). Both agree on the evaluation mask and
on the matching; where they differ it is said below which one is followed.

1. **Evaluation mask** (:func:`evaluation_mask`): the tumour mask at level 5, i.e. one pixel is
   ``2**5 = 32`` level-0 pixels (``32 * l0_mpp`` um). Euclidean distance transform of the
   non-tumour pixels; pixels with distance ``< 75 / (2 * eval_mpp)`` (37.5 um, half of the 75 um
   "5 tumour cells") join the tumour (strict ``<`` as in both Python scripts; the 2016 MATLAB
   code has ``<=``); holes filled (``scipy.ndimage.binary_fill_holes``); connected components
   labelled with 8-connectivity (``skimage.measure.label(connectivity=2)``). Each label is a lesion.
   *Deviation:* the challenge code hard-codes ``L0_RESOLUTION = 0.243`` um/px; here the slide's
   own level-0 um/px is used (0.226 for Utrecht slides), for the mask pixel, the dilation and the
   ITC size alike. The polygons are rasterised at the evaluation resolution (a pixel is tumour when
   its centre lies inside, :func:`wsi_toolkit.annotations.rasterize`) instead of reading level 5
   of a mask TIFF; mask TIFFs are sampled at the evaluation pixel centres.
2. **Isolated tumour cells**: a label whose ``regionprops`` major axis (``axis_major_length``, the
   old ``major_axis_length``) is ``< 275 um`` (200 um ITC size + the 75 um dilation) counts neither
   as a lesion to find nor as a false positive: detections on it are ignored.
3. **Matching** (:func:`match_detections`): a detection at level-0 ``(x, y)`` (x = column,
   y = row) hits ``labels[floor(y / 32), floor(x / 32)]`` -- the geometric mapping, the same as
   the 2016 script's integer division (the data-release script rounds instead, a half-pixel
   shift). Label 0 = false positive; an ITC label = ignored; a lesion keeps the highest
   probability among its detections (others are neither hits nor false positives). On a slide
   without tumour every detection is a false positive. *Deviation:* a detection outside the
   evaluation mask is a false positive (the challenge code would fail with an IndexError).
4. **Curve** (:func:`froc_curve`): thresholds are the distinct non-zero probabilities of the false
   positives and of the per-lesion best hits (the data-release rule ``set(...) - {0.0}``; a missed
   lesion sits in the list as 0 and never counts). For each threshold ``t`` in increasing order:
   average false positives per slide ``= #FP(p >= t) / n_slides`` and sensitivity
   ``= #lesions(best p >= t) / n_lesions``; a final point (0, 0) is appended. The 2016 script
   drops the smallest distinct value instead of 0 -- identical whenever some lesion is missed or
   any ITC exists, but it throws away the lowest real operating point otherwise (a perfect
   detector would score 0 there). A detection of probability 0 never counts.
5. **Score** (:func:`sensitivities_at`): the mean sensitivity at 1/4, 1/2, 1, 2, 4 and 8 average
   false positives per slide, picked by the data-release rule (``compute_score``): with the curve
   in increasing-FP order, take the *first* operating point whose average FP count is ``>=`` the
   target (``bisect_left``), or the last point when the curve never gets there. No interpolation:
   when the curve jumps over a target the sensitivity of the point just above the target is taken,
   and when several points sit exactly at the target the first (highest threshold, lowest
   sensitivity) is taken. (Several third-party re-implementations use ``np.interp`` instead;
   scores differ slightly.)

Slide level: ROC AUC (scikit-learn) of a slide score (:data:`SLIDE_SCORES`; default ``"max"``,
the highest heatmap probability, read from ``heatmap.tif`` as ``uint8 / 255`` like the
detections; for detection-CSV input the highest detection probability) for tumour (any tumour
annotation) vs normal slides.

Detections from heatmaps (:func:`detections_from_heatmap`): cells that are the maximum of the
disk of radius ``nms_radius_um`` around them and at least ``min_prob``, then greedy
non-maximum suppression (highest first; a kept detection removes every candidate within the
radius, which turns a plateau into one detection per radius). Defaults: 150 um -- well above the
75 um the evaluation joins anyway and below the 275 um that the smallest countable (non-ITC)
lesion spans, so two compact lesions the evaluation keeps apart are not merged, yet a large
uniform lesion does not shower its rim with false positives; ``min_prob = 0.1``, low, because the
FROC curve is traced by sweeping the threshold over the detections' probabilities (Camelyon16
teams submitted many low-confidence candidates for the same reason). Each detection sits at the
centre of its heatmap cell, ``floor`` -ed to the level-0 pixel that contains it.

Example
-------
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

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_toolkit.errors import AnnotationError, ConfigError, DetectionFileError, one_line
from wsi_toolkit.limits import MAX_COORD_L0, MAX_EVAL_MASK_PIXELS, MPP_RANGE_UM, in_range, range_text
from wsi_toolkit.export import atomic_path, write_json_atomic, write_text_atomic

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

log = logging.getLogger(__name__)

#: Pyramid level of the evaluation mask: one pixel = 2**5 = 32 level-0 pixels.
EVAL_LEVEL = 5
#: Tumour within this distance (um) of each other is one lesion: the mask is dilated by half of it.
DILATION_UM = 75.0
#: Lesions (after the dilation) whose major axis is below this (um) are isolated tumour cells.
ITC_MAJOR_AXIS_UM = 275.0
#: Average false positives per slide at which the FROC score averages the sensitivity.
TARGET_FPS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The level-0 um/px the challenge code hard-codes; used here only for detection CSVs of slides
#: whose resolution is known from nowhere else.
CAMELYON16_L0_MPP = 0.243
#: Detection CSVs larger than this are refused, not read into memory (~2 million detections).
MAX_DETECTION_CSV_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# Evaluation mask
# --------------------------------------------------------------------------------------------


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
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"EvaluationMask.{name} must be a positive number; got {value!r}")
            object.__setattr__(self, name, float(value))
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
        ITC labels = major axis < 275 um. See the module docstring.
    """
    from scipy import ndimage
    from skimage.measure import label, regionprops

    tumor = np.asarray(tumor_rc).astype(bool)
    if tumor.ndim != 2:
        raise ConfigError(f"tumor_rc must be a 2-D mask (rows, cols); got shape {tumour.shape}")
    if not (math.isfinite(eval_mpp) and eval_mpp > 0):
        raise ConfigError(f"eval_mpp must be a positive number of um/px; got {eval_mpp!r}")
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

    if not (isinstance(level, (int, np.integer)) and 0 <= level <= 12):
        raise ConfigError(f"level must be an integer in 0..12; got {level!r}")
    if not isinstance(tumor_l0, shapely.Geometry):
        parts = list(tumor_l0)
        tumor_l0 = shapely.union_all(parts) if parts else shapely.Polygon()
    l0_per_px = float(2**int(level))
    eval_mpp = l0_per_px * float(l0_mpp)
    tumor_rc = rasterize(tumor_l0, l0_size=l0_size, l0_mpp=l0_mpp, mask_mpp=eval_mpp)
    return evaluation_mask_from_tumor(tumor_rc, eval_mpp=eval_mpp, l0_per_px=l0_per_px)


# --------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------


def _check_detections(detections: Any, where: str = "detections") -> np.ndarray:
    try:
        det = np.asarray(detections, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an array of (prob, x, y) rows; got {type(detections).__name__}") from None
    if det.size == 0:
        return np.zeros((0, 3), np.float64)
    if det.ndim != 2 or det.shape[1] != 3:
        raise ConfigError(f"{where} must have shape (N, 3) = (prob, x, y); got {det.shape}")
    if not np.all(np.isfinite(det)):
        raise ConfigError(f"{where} has non-finite values (row {int(np.flatnonzero(~np.isfinite(det).all(1))[0])})")
    if det[:, 0].min() < 0:
        raise ConfigError(f"{where}: probabilities must be >= 0; got {det[:, 0].min()!r}")
    return det


def detections_from_heatmap(
    prob: np.ndarray,
    cell_l0: float,
    *,
    l0_mpp: float,
    nms_radius_um: float = 150.0,
    min_prob: float = 0.1,
    origin_l0: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Lesion candidates of a heatmap: local maxima after non-maximum suppression.

    Parameters
    ----------
    prob : ndarray, float, (rows, cols)
        Tumour probability per heatmap cell, in [0, 1].
    cell_l0 : float
        Level-0 px per heatmap cell (cell ``[r, c]`` covers level-0
        ``[c*cell_l0, (c+1)*cell_l0) x [r*cell_l0, (r+1)*cell_l0)`` from ``origin_l0``).
    l0_mpp : float
        um per level-0 px (to turn ``nms_radius_um`` into cells).
    nms_radius_um : float
        Suppression radius (um): a detection is the maximum of the disk of this radius around it,
        and no two detections are closer than it (greedy, highest probability first; ties in
        raster order). 0 keeps every cell >= ``min_prob``.
    min_prob : float
        Keep detections with probability >= this, in (0, 1].
    origin_l0 : (float, float)
        Level-0 ``(x, y)`` of the heatmap's top-left corner.

    Returns
    -------
    ndarray, float64, (N, 3)
        Rows ``(prob, x, y)``, x = column, y = row, in level-0 px: the cell centre
        ``origin + (c + 0.5) * cell_l0`` floored to the level-0 pixel that contains it (integer
        valued, so that a CSV of them evaluates the same). Sorted by decreasing probability.

    Example
    -------
    >>> p = np.zeros((4, 6)); p[1, 4] = 0.9
    >>> detections_from_heatmap(p, 128, l0_mpp=0.243).tolist()
    [[0.9, 576.0, 192.0]]
    """
    from scipy import ndimage

    p = np.asarray(prob, dtype=np.float64)
    if p.ndim != 2:
        raise ConfigError(f"prob must be a 2-D heatmap (rows, cols); got shape {p.shape}")
    for name, value in (("cell_l0", cell_l0), ("l0_mpp", l0_mpp)):
        if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number; got {value!r}")
    if not (math.isfinite(nms_radius_um) and nms_radius_um >= 0):
        raise ConfigError(f"nms_radius_um must be >= 0 um; got {nms_radius_um!r}")
    if not (0 < min_prob <= 1):
        raise ConfigError(f"min_prob must be in (0, 1]; got {min_prob!r} (0 would make every empty cell a detection)")
    if p.size and not np.all(np.isfinite(p)):
        raise ConfigError("prob has non-finite values")
    if p.size == 0:
        return np.zeros((0, 3), np.float64)
    r_cells = float(nms_radius_um) / (float(cell_l0) * float(l0_mpp))
    rad = int(math.floor(r_cells))
    dy, dx = np.mgrid[-rad:rad + 1, -rad:rad + 1]
    footprint = dy.astype(np.float64) ** 2 + dx.astype(np.float64) ** 2 <= r_cells**2
    peak = (p >= min_prob) & (p == ndimage.maximum_filter(p, footprint=footprint, mode="constant", cval=-np.inf))
    rr, cc = np.nonzero(peak)
    order = np.lexsort((cc, rr, -p[rr, cc]))  # probability down, then raster order
    suppressed = np.zeros(p.shape, bool)
    h, w = p.shape
    keep = []
    for i in order:
        r, c = int(rr[i]), int(cc[i])
        if suppressed[r, c]:
            continue
        keep.append(i)
        ra, rb, ca, cb = max(r - rad, 0), min(r + rad + 1, h), max(c - rad, 0), min(c + rad + 1, w)
        suppressed[ra:rb, ca:cb] |= footprint[ra - r + rad:rb - r + rad, ca - c + rad:cb - c + rad]
    keep_idx = np.asarray(keep, dtype=np.int64)
    r_k, c_k = rr[keep_idx], cc[keep_idx]
    x = np.floor(origin_l0[0] + (c_k + 0.5) * float(cell_l0))
    y = np.floor(origin_l0[1] + (r_k + 0.5) * float(cell_l0))
    return np.column_stack([p[r_k, c_k], x, y]).astype(np.float64).reshape(-1, 3)


def write_detections_csv(path: str | os.PathLike[str], detections: np.ndarray) -> None:
    """Write detections in the Camelyon16 submission format, atomically.

    One line per detection, no header: ``prob,x,y`` with the probability written exactly
    (``repr``) and ``x``, ``y`` integer level-0 px (floored).
    """
    det = _check_detections(detections)
    lines = [f"{float(p)!r},{int(math.floor(x))},{int(math.floor(y))}\n" for p, x, y in det.tolist()]
    write_text_atomic(path, "".join(lines))


_PROB_NAMES = ("p", "prob", "probability", "confidence", "score")


def read_detections_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a Camelyon16 detection CSV: ``prob,x,y`` per line (level-0 px, x = column).

    A header is accepted when it names the columns (``p``/``prob``/``probability``/``confidence``,
    ``x``, ``y``, as the data-release evaluator expects); without one the first three columns are
    ``prob, x, y`` (the challenge's submission format). Coordinates are floored to integers (the
    challenge parses them with ``int``). Blank lines are skipped.

    Returns
    -------
    ndarray, float64, (N, 3)

    Raises
    ------
    DetectionFileError
        Missing file, not UTF-8, unparseable number, fewer than three columns, negative probability,
        a coordinate beyond any slide (``|x|, |y| > 2**24``), a file over 64 MiB. The message names
        the file and the line (counted in the file: the header and blank lines included).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DETECTION_CSV_BYTES:
            raise DetectionFileError(
                f"{path}: {size:,} bytes; a detection CSV holds at most a few thousand 'prob,x,y' lines (files up to "
                f"{MAX_DETECTION_CSV_BYTES // 2**20} MiB are read); keep the candidates above a low probability")
        data = path.read_bytes()
    except OSError as exc:
        raise DetectionFileError(f"{path}: cannot read the detection CSV ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DetectionFileError(
            f"{path}: line {line} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); a detection "
            "CSV is plain 'prob,x,y' text, save it as UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []  # (line number in the file, cells)
    try:
        for row in reader:
            if row and any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as exc:
        raise DetectionFileError(f"{path}: line {reader.line_num} is not CSV ({one_line(exc)})") from None
    cols = (0, 1, 2)
    if rows:
        head = [cell.strip().casefold() for cell in rows[0][1]]
        try:
            float(head[0])
        except ValueError:
            try:
                i_p = next(i for i, name in enumerate(head) if name in _PROB_NAMES)
                cols = (i_p, head.index("x"), head.index("y"))
            except (StopIteration, ValueError):
                raise DetectionFileError(
                    f"{path}: header {rows[0][1]!r} does not name the columns p (or prob/probability/confidence), "
                    "x and y; write 'prob,x,y' lines without a header or name the columns") from None
            rows = rows[1:]
    out = np.zeros((len(rows), 3), np.float64)
    for n, (line, row) in enumerate(rows):
        try:
            out[n] = [float(row[i]) for i in cols]
        except (IndexError, ValueError):
            raise DetectionFileError(
                f"{path}: line {line} {','.join(row)[:200]!r} is not 'prob,x,y' (numbers, x and y in level-0 px)"
            ) from None
        p, x, y = out[n]
        if not (math.isfinite(p) and math.isfinite(x) and math.isfinite(y)):
            raise DetectionFileError(f"{path}: line {line} {','.join(row)[:200]!r} has a non-finite number")
        if p < 0:
            raise DetectionFileError(f"{path}: line {line}: probabilities must be >= 0; got {p!r}")
        if abs(x) > MAX_COORD_L0 or abs(y) > MAX_COORD_L0:
            raise DetectionFileError(
                f"{path}: line {line}: ({x:g}, {y:g}) is not a level-0 pixel of any slide (|x|, |y| <= "
                f"{MAX_COORD_L0:,.0f}); write x and y in level-0 px of the slide")
    out[:, 1:] = np.floor(out[:, 1:])
    return out


# --------------------------------------------------------------------------------------------
# Matching and FROC
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SlideMatch:
    """How one slide's detections meet its evaluation mask (Camelyon16 matching rules).

    Attributes
    ----------
    is_tumor : bool
        The slide has an evaluation mask (a normal slide has none: every detection is an FP).
    n_detections : int
    fp_probs : ndarray, float64, (n_fp,)
        Probabilities of the false positives (detections on label 0), in input order.
    lesion_labels : ndarray, int64, (n_lesions,)
        The non-ITC labels of the mask.
    lesion_probs : ndarray, float64, (n_lesions,)
        Best probability among the detections on each lesion; 0 = missed.
    lesion_best : ndarray, int64, (n_lesions,)
        Index (into the detections) of that best detection; -1 = missed.
    hit_labels : ndarray, int64, (n_detections,)
        Label under each detection (0 = background; always 0 on a normal slide).
    n_itc : int
        ITC labels of the mask (excluded).
    n_itc_hits : int
        Detections that fell on an ITC label (ignored).
    """

    is_tumor: bool
    n_detections: int
    fp_probs: np.ndarray = field(repr=False)
    lesion_labels: np.ndarray = field(repr=False)
    lesion_probs: np.ndarray = field(repr=False)
    lesion_best: np.ndarray = field(repr=False)
    hit_labels: np.ndarray = field(repr=False)
    n_itc: int = 0
    n_itc_hits: int = 0

    @property
    def n_lesions(self) -> int:
        return int(len(self.lesion_labels))

    @property
    def n_fp(self) -> int:
        return int(len(self.fp_probs))

    @property
    def n_found(self) -> int:
        """Lesions hit by a detection of probability > 0."""
        return int(np.count_nonzero(self.lesion_probs > 0))

    @property
    def n_missed(self) -> int:
        return self.n_lesions - self.n_found


def match_detections(detections: np.ndarray, mask: EvaluationMask | None) -> SlideMatch:
    """Classify one slide's detections (module docstring, rule 3).

    Parameters
    ----------
    detections : array, (N, 3)
        ``(prob, x, y)`` rows, level-0 px, probabilities >= 0.
    mask : EvaluationMask or None
        None for a slide without tumour.
    """
    det = _check_detections(detections)
    n = len(det)
    if mask is None:
        return SlideMatch(is_tumor=False, n_detections=n, fp_probs=det[:, 0].copy(),
                          lesion_labels=np.zeros(0, np.int64), lesion_probs=np.zeros(0),
                          lesion_best=np.zeros(0, np.int64), hit_labels=np.zeros(n, np.int64))
    hit = mask.label_at(det[:, 1:3])
    lesions = mask.lesion_labels
    best_prob = np.zeros(mask.n_labels + 1, np.float64)
    best_idx = np.full(mask.n_labels + 1, -1, np.int64)
    is_itc = np.isin(hit, np.fromiter(mask.itc_labels, np.int64, len(mask.itc_labels)))
    for i in np.flatnonzero((hit > 0) & ~is_itc):
        lab, p = int(hit[i]), float(det[i, 0])
        if p > best_prob[lab]:  # strict: the first of equal probabilities keeps the lesion
            best_prob[lab], best_idx[lab] = p, i
    return SlideMatch(is_tumor=True, n_detections=n, fp_probs=det[hit == 0, 0].copy(), lesion_labels=lesions,
                      lesion_probs=best_prob[lesions], lesion_best=best_idx[lesions], hit_labels=hit,
                      n_itc=len(mask.itc_labels), n_itc_hits=int(np.count_nonzero(is_itc)))


@dataclass(frozen=True, eq=False)
class FrocResult:
    """The FROC curve and score over a set of slides.

    Attributes
    ----------
    score : float
        Mean of :attr:`sensitivities` (NaN when there is no lesion to find).
    sensitivities : tuple of float
        Sensitivity at each of :attr:`targets` average FPs per slide (rule in the module docstring).
    targets : tuple of float
        :data:`TARGET_FPS`.
    thresholds : ndarray, float64, (K,)
        The distinct non-zero probabilities, increasing.
    avg_fps, sensitivity : ndarray, float64, (K + 1,)
        The curve in the challenge's order: point ``i < K`` at threshold ``thresholds[i]``
        (``p >= t``), then the appended point (0, 0). Average FPs decrease along it.
    n_slides, n_lesions, n_itc, n_fp, n_detections : int
        Totals (ITC labels excluded from ``n_lesions``; ``n_fp`` at the lowest threshold).
    matches : tuple of SlideMatch
        Per slide, in input order.
    """

    score: float
    sensitivities: tuple[float, ...]
    targets: tuple[float, ...]
    thresholds: np.ndarray = field(repr=False)
    avg_fps: np.ndarray = field(repr=False)
    sensitivity: np.ndarray = field(repr=False)
    n_slides: int = 0
    n_lesions: int = 0
    n_itc: int = 0
    n_fp: int = 0
    n_detections: int = 0
    matches: tuple[SlideMatch, ...] = field(default=(), repr=False)

    @property
    def n_found(self) -> int:
        return int(sum(m.n_found for m in self.matches))


def sensitivities_at(avg_fps: Sequence[float], sensitivity: Sequence[float],
                     targets: Sequence[float] = TARGET_FPS) -> np.ndarray:
    """Sensitivity at each target average-FP rate by the CAMELYON16 data-release rule.

    ``avg_fps`` / ``sensitivity`` in the challenge's order (decreasing FPs, ending with the (0, 0)
    point). Reversed to increasing FPs, the pick for target ``t`` is the point at index
    ``min(bisect_left(fps, t), n - 1)``: the first point with ``avg_fps >= t``, or the last point.
    """
    fps = np.asarray(avg_fps, dtype=np.float64)[::-1]
    sens = np.asarray(sensitivity, dtype=np.float64)[::-1]
    if fps.shape != sens.shape or fps.ndim != 1 or fps.size == 0:
        raise ConfigError(f"avg_fps and sensitivity must be 1-D and of equal, non-zero length; got "
                          f"{fps.shape} and {sens.shape}")
    if np.any(np.diff(fps) < 0):
        raise ConfigError("avg_fps must not increase along the curve (thresholds increasing)")
    idx = np.minimum(np.searchsorted(fps, np.asarray(targets, np.float64), side="left"), fps.size - 1)
    return sens[idx]


def froc_curve(matches: Sequence[SlideMatch], *, targets: Sequence[float] = TARGET_FPS) -> FrocResult:
    """The FROC curve and score of matched slides (module docstring, rules 4 and 5).

    ``n_slides = len(matches)`` (normal slides count in the FP average).
    """
    matches = tuple(matches)
    if not matches:
        raise ConfigError("froc needs at least one slide")
    fp = np.concatenate([m.fp_probs for m in matches]).astype(np.float64)
    tp = np.concatenate([m.lesion_probs for m in matches]).astype(np.float64)
    n_slides = len(matches)
    n_lesions = int(len(tp))
    thresholds = np.unique(np.concatenate([fp, tp]))
    thresholds = thresholds[thresholds != 0.0]
    fp_sorted, tp_sorted = np.sort(fp), np.sort(tp)
    fp_counts = fp_sorted.size - np.searchsorted(fp_sorted, thresholds, side="left")  # #(p >= t)
    tp_counts = tp_sorted.size - np.searchsorted(tp_sorted, thresholds, side="left")
    avg_fps = np.append(fp_counts, 0) / float(n_slides)
    if n_lesions:
        sensitivity = np.append(tp_counts, 0) / float(n_lesions)
        sens_at = sensitivities_at(avg_fps, sensitivity, targets)
        score = float(np.mean(sens_at))
    else:
        log.warning("FROC: no lesion to find (no tumour slide, or only isolated tumour cells); the score is undefined")
        sensitivity = np.full(avg_fps.shape, np.nan)
        sens_at = np.full(len(targets), np.nan)
        score = math.nan
    return FrocResult(score=score, sensitivities=tuple(float(s) for s in sens_at),
                      targets=tuple(float(t) for t in targets),
                      thresholds=thresholds, avg_fps=avg_fps, sensitivity=sensitivity, n_slides=n_slides,
                      n_lesions=n_lesions, n_itc=int(sum(m.n_itc for m in matches)),
                      n_fp=int(np.count_nonzero(fp > 0)), n_detections=int(sum(m.n_detections for m in matches)),
                      matches=matches)


def froc(slides: Iterable[tuple[np.ndarray, EvaluationMask | None]], *,
         targets: Sequence[float] = TARGET_FPS) -> FrocResult:
    """Camelyon16 FROC of ``(detections, evaluation mask or None)`` per slide.

    ``detections``: (N, 3) ``(prob, x, y)`` level-0 px; mask ``None`` = normal slide.
    See the module docstring for every rule.
    """
    return froc_curve([match_detections(det, mask) for det, mask in slides], targets=targets)


def slide_auc(scores: Sequence[float], truths: Sequence[bool]) -> float:
    """ROC AUC of slide scores for tumour (True) vs normal (False); NaN unless both occur."""
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truths, dtype=bool)
    if s.shape != t.shape or s.ndim != 1:
        raise ConfigError(f"scores and truths must be 1-D of equal length; got {s.shape} and {t.shape}")
    if not np.all(np.isfinite(s)):
        raise ConfigError("slide scores must be finite")
    if t.all() or not t.any():
        return math.nan
    return float(roc_auc_score(t, s))


def _top10(values: np.ndarray) -> float:
    v = np.sort(values.ravel())[-10:]
    return float(v.mean()) if v.size else 0.0


#: Slide score registry: name -> function(probabilities, any shape) -> float (0 when empty).
SLIDE_SCORES: dict[str, Callable[[np.ndarray], float]] = {
    "max": lambda v: float(v.max()) if v.size else 0.0,
    "top10": _top10,
}


# --------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend)
# --------------------------------------------------------------------------------------------


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def plot_froc(result: FrocResult, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Write the FROC curve (sensitivity vs average FPs per slide) as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
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
    _save_figure(fig, Path(path))


def plot_roc(scores: Sequence[float], truths: Sequence[bool], path: str | os.PathLike[str], *,
             title: str = "") -> None:
    """Write the slide-level ROC curve as a PNG, atomically (a note instead when one class is absent)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truths, dtype=bool)
    auc = slide_auc(s, t)
    fig = Figure(figsize=(4.8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    if math.isfinite(auc):
        fpr, tpr, _ = roc_curve(t, s)
        ax.plot(fpr, tpr, color="black", lw=1.5, label=f"AUC {auc:.3f}")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "needs tumour and normal slides", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false positive rate (normal slides)")
    ax.set_ylabel("true positive rate (tumour slides)")
    ax.set_title(title or f"slide-level ROC: {int(t.sum())} tumour, {int((~t).sum())} normal", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, Path(path))


# --------------------------------------------------------------------------------------------
# Files: masks, results folders, the whole evaluation
# --------------------------------------------------------------------------------------------


def _tiff_mpp(page: Any) -> float | None:
    """um per px of a TIFF page from its resolution tags, or None."""
    try:
        x_res = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    except (KeyError, TypeError, ValueError):
        return None
    try:
        per_unit = x_res[0] / x_res[1] if isinstance(x_res, tuple) else float(x_res)
    except (TypeError, ZeroDivisionError):
        return None
    if not (per_unit > 0) or unit not in (2, 3):
        return None
    um = 25400.0 if unit == 2 else 10000.0
    mpp = um / per_unit
    return mpp if 0.01 < mpp < 1000 else None  # 72 dpi defaults etc. are not a resolution


def read_mask_tiff(path: str | os.PathLike[str], *, l0_size: tuple[int, int] | None, l0_per_px: float,
                   tumor_value: int | None = None) -> tuple[np.ndarray, tuple[int, int], float | None]:
    """A Camelyon16-style mask TIFF as a boolean tumour mask on the evaluation grid.

    The mask is mapped onto the slide by its size: the level-0 extent of the slide
    (``l0_size``; the mask's own level-0 size when None) is what the mask covers. The coarsest
    pyramid level at least as fine as the evaluation grid is read (a single-level mask is read
    whole) and sampled at the evaluation pixel centres (nearest neighbour). RGB masks: the first
    channel (as the challenge code reads them).

    Parameters
    ----------
    l0_size : (int, int) or None
        Slide level-0 ``(width, height)`` px.
    l0_per_px : float
        Level-0 px per evaluation pixel (32).
    tumor_value : int or None
        Pixel value of tumour; None = any non-zero value.

    Returns
    -------
    (tumor_rc, l0_size, mask_l0_mpp)
        ``tumor_rc`` bool ``(ceil(h / k), ceil(w / k))``; the level-0 size used; the um/px of the
        mask's level 0 from its resolution tags (None without tags).
    """
    import tifffile

    path = Path(path)
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise AnnotationError(f"{path}: cannot read the mask TIFF ({one_line(exc)})") from None
    with tif:
        if not tif.series:
            raise AnnotationError(f"{path}: the mask TIFF holds no image")
        series = max(tif.series, key=lambda s: s.levels[0].keyframe.imagewidth * s.levels[0].keyframe.imagelength)
        levels = list(series.levels)
        sizes = [(int(lv.keyframe.imagewidth), int(lv.keyframe.imagelength)) for lv in levels]
        mask_mpp = _tiff_mpp(levels[0].keyframe)
        if l0_size is None:
            l0_size = sizes[0]
        l0_w, l0_h = int(l0_size[0]), int(l0_size[1])
        m0_w, m0_h = sizes[0]
        if abs((l0_w / m0_w) / (l0_h / m0_h) - 1) > 0.02:
            raise AnnotationError(
                f"{path}: mask size {m0_w}x{m0_h} does not have the slide's aspect ({l0_w}x{l0_h}); "
                "is it the mask of another slide?")
        fine_enough = [i for i, (w, _) in enumerate(sizes) if w * l0_per_px >= l0_w - l0_per_px]
        if not fine_enough:
            log.warning("%s: even level 0 (%dx%d) is coarser than the evaluation grid; upsampled", path, m0_w, m0_h)
        i = max(fine_enough) if fine_enough else 0
        _check_eval_mask_size((l0_w, l0_h), l0_per_px, where=str(path))
        lw, lh = sizes[i]
        if lw * lh > MAX_EVAL_MASK_PIXELS:
            raise AnnotationError(
                f"{path}: mask level {i} is {lw:,} x {lh:,} px and no coarser level is fine enough for the evaluation "
                f"grid; at most {MAX_EVAL_MASK_PIXELS:,} px are read, save the mask as a pyramid (levels down to "
                f"{l0_per_px:g}x)")
        try:
            arr = np.asarray(levels[i].asarray())
        except (ValueError, RuntimeError, tifffile.TiffFileError) as exc:
            raise AnnotationError(f"{path}: mask level {i} cannot be decoded ({one_line(exc)}); the mask TIFF is damaged") from None
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise AnnotationError(
            f"{path}: mask level {i} has shape {arr.shape}; expected (rows, cols) or (rows, cols, channels)")
    m_h, m_w = arr.shape
    e_h, e_w = max(1, math.ceil(l0_h / l0_per_px - 1e-9)), max(1, math.ceil(l0_w / l0_per_px - 1e-9))
    cols = np.minimum(np.floor((np.arange(e_w) + 0.5) * l0_per_px * m_w / l0_w).astype(np.int64), m_w - 1)
    rows = np.minimum(np.floor((np.arange(e_h) + 0.5) * l0_per_px * m_h / l0_h).astype(np.int64), m_h - 1)
    sampled = arr[np.ix_(rows, cols)]
    tumor = sampled != 0 if tumor_value is None else sampled == tumor_value
    if mask_mpp is not None:
        mask_mpp = mask_mpp * m0_w / l0_w  # um per slide level-0 px
    return tumor, (l0_w, l0_h), mask_mpp


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``wsi-eval`` (written to ``metrics.json``).

    Attributes
    ----------
    nms_radius_um : float
        Detection NMS radius (um), see :func:`detections_from_heatmap`.
    min_prob : float
        Lowest detection probability kept from heatmaps, in (0, 1].
    slide_score : str
        Key of :data:`SLIDE_SCORES`, applied to the heatmap (or, for CSV input, the detections).
    level : int
        Evaluation level (5: one pixel = 32 level-0 px).
    mask_value : int or None
        Tumour value in mask TIFFs (None = any non-zero; the CAMELYON16 data-release masks use 2).
    mpp : float or None
        Level-0 um/px of slides given only as detection CSVs (heatmap results carry theirs in
        ``run.json``); None = the mask TIFF's resolution tags, else 0.243 (the challenge's constant).
    """

    nms_radius_um: float = 150.0
    min_prob: float = 0.1
    slide_score: str = "max"
    level: int = EVAL_LEVEL
    mask_value: int | None = None
    mpp: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.nms_radius_um, (int, float)) and math.isfinite(self.nms_radius_um)
                and self.nms_radius_um >= 0):
            raise ConfigError(f"nms_radius_um must be >= 0 um; got {self.nms_radius_um!r}")
        if not (isinstance(self.min_prob, (int, float)) and 0 < self.min_prob <= 1):
            raise ConfigError(f"min_prob must be in (0, 1]; got {self.min_prob!r}")
        if self.slide_score not in SLIDE_SCORES:
            raise ConfigError(f"slide_score must be one of {sorted(SLIDE_SCORES)}; got {self.slide_score!r}")
        if not (isinstance(self.level, int) and 0 <= self.level <= 12):
            raise ConfigError(f"level must be an integer in 0..12; got {self.level!r}")
        if self.mask_value is not None and not (isinstance(self.mask_value, int) and self.mask_value > 0):
            raise ConfigError(
                f"mask_value must be a positive integer (or None = any non-zero); got {self.mask_value!r}")
        if self.mpp is not None and not in_range(self.mpp, MPP_RANGE_UM):
            raise ConfigError(f"mpp (--mpp) must be the slides' level-0 micrometres per pixel in "
                              f"{range_text(MPP_RANGE_UM, 'um/px')} (Camelyon16: 0.243 or 0.226); got {self.mpp!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SlideEval:
    """One row of ``slides.csv``."""

    slide: str
    source: Literal["heatmap", "csv"]
    truth: Literal["tumor", "normal"]
    score: float
    n_detections: int
    n_fp: int
    n_lesions: int
    lesions_found: int
    lesions_missed: int
    n_itc: int
    itc_hits: int
    l0_mpp: float
    annotation: str = ""

    def row(self) -> dict:
        return asdict(self)


SLIDE_COLUMNS = tuple(SlideEval.__dataclass_fields__)


@dataclass(frozen=True, eq=False)
class EvalReport:
    """What :func:`evaluate_results` computed and wrote."""

    froc: FrocResult
    slide_auc: float
    slides: tuple[SlideEval, ...]
    metrics: dict
    files: dict[str, Path]


@dataclass
class _Source:
    stem: str
    kind: Literal["heatmap", "csv"]
    path: Path
    run: dict | None = None


def _find_sources(results: Path) -> list[_Source]:
    """wsi-infer slide folders (finished: run.json ok + heatmap.tif) and top-level ``<stem>.csv`` files."""
    if not results.is_dir():
        raise ConfigError(f"--results {results} is not a folder; pass the wsi-infer output folder or a folder of "
                          "<slide>.csv detection files")
    found: dict[str, _Source] = {}
    for d in sorted(p for p in results.iterdir() if p.is_dir()):
        run_json, heat = d / "run.json", d / "heatmap.tif"
        if not run_json.is_file():
            if heat.is_file():
                log.warning("%s: no run.json (unfinished wsi-infer run?); skipped", d)
            continue
        try:
            run = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable run.json (%s); skipped", d, exc)
            continue
        if run.get("status") != "ok" or not heat.is_file() or "heatmap" not in run:
            log.warning("%s: not a finished wsi-infer slide (status %r); skipped", d, run.get("status"))
            continue
        found[d.name] = _Source(d.name, "heatmap", d, run)
    for f in sorted(p for p in results.iterdir() if p.is_file() and p.suffix.lower() == ".csv"):
        if f.name == "summary.csv":  # wsi-infer's batch table
            continue
        if f.stem in found:
            log.warning("%s: slide %s also has a heatmap folder; the heatmap is evaluated", f, f.stem)
            continue
        found[f.stem] = _Source(f.stem, "csv", f)
    return [found[k] for k in sorted(found)]


_ANNOTATION_PATTERNS = ("{}.xml", "{}.geojson", "{}.json", "{}_mask.tif", "{}_mask.tiff", "{}.tif", "{}.tiff")


def _is_single_channel_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return int(tif.pages[0].samplesperpixel) == 1
    except Exception:  # not a readable TIFF: let the reader report it if chosen
        return True


def _find_annotation(index: Mapping[str, Path], stem: str, slide_path: Path | None) -> Path | None:
    for pattern in _ANNOTATION_PATTERNS:
        path = index.get(pattern.format(stem).casefold())
        if path is None:
            continue
        if pattern.startswith("{}.tif"):
            # A plain <stem>.tif next to the slides may be the slide itself, not its mask.
            if slide_path is not None and slide_path.exists() and path.resolve() == slide_path.resolve():
                continue
            if not _is_single_channel_tiff(path):
                log.info("%s: RGB TIFF, taken for a slide rather than a mask; not used as annotation", path)
                continue
        return path
    return None


def _slide_truth(ann: Path | None, *, l0_size: tuple[int, int] | None, l0_mpp: float | None, config: EvalConfig,
                 detections: np.ndarray) -> tuple[bool, EvaluationMask | None, float]:
    """(is tumour slide, evaluation mask or None, level-0 um/px used)."""
    from wsi_toolkit.annotations import check_on_slide, read_asap_xml, read_geojson, tumor_region

    l0_per_px = float(2**config.level)
    if ann is None:
        return False, None, l0_mpp if l0_mpp is not None else (config.mpp or CAMELYON16_L0_MPP)
    suffix = ann.suffix.lower()
    if suffix in (".tif", ".tiff"):
        tumor_rc, l0_size, tag_mpp = read_mask_tiff(ann, l0_size=l0_size, l0_per_px=l0_per_px,
                                                     tumor_value=config.mask_value)
        if l0_mpp is None:
            l0_mpp = config.mpp or tag_mpp
            if l0_mpp is None:
                log.warning("%s: resolution unknown; level-0 %.3f um/px assumed (pass --mpp)", ann, CAMELYON16_L0_MPP)
                l0_mpp = CAMELYON16_L0_MPP
        if not tumor_rc.any():
            return False, None, l0_mpp
        return True, evaluation_mask_from_tumor(tumor_rc, eval_mpp=l0_per_px * l0_mpp, l0_per_px=l0_per_px), l0_mpp
    anns = read_asap_xml(ann) if suffix == ".xml" else read_geojson(ann)
    region = tumor_region(anns)
    if l0_mpp is None:
        l0_mpp = config.mpp
        if l0_mpp is None:
            l0_mpp = CAMELYON16_L0_MPP
            if not region.is_empty:
                log.warning("%s: slide resolution unknown; level-0 %.3f um/px assumed (pass --mpp)", ann, l0_mpp)
    if region.is_empty:
        return False, None, l0_mpp
    if l0_size is None:
        # Detections only, the slide's size unknown: the mask covers the annotations. A detection beyond
        # it is a false positive (label 0) whatever its coordinates; it never grows the mask.
        _, _, max_x, max_y = region.bounds
        l0_size = (int(math.floor(max_x)) + 1, int(math.floor(max_y)) + 1)
    else:
        check_on_slide(anns, l0_size, where=str(ann))
    _check_eval_mask_size(l0_size, l0_per_px, where=str(ann))
    return True, evaluation_mask(region, l0_size=l0_size, l0_mpp=l0_mpp, level=config.level), l0_mpp


def _check_eval_mask_size(l0_size: tuple[int, int], l0_per_px: float, *, where: str) -> None:
    rows, cols = (math.ceil(int(v) / l0_per_px) for v in (l0_size[1], l0_size[0]))
    if rows * cols > MAX_EVAL_MASK_PIXELS:
        raise ConfigError(
            f"{where}: the evaluation mask of a {int(l0_size[0]):,} x {int(l0_size[1]):,} px slide would be {cols:,} x "
            f"{rows:,} px, more than {MAX_EVAL_MASK_PIXELS:,} (a 130 mm slide at 0.08 um/px); the slide size or the "
            "annotation coordinates are not level-0 px")


def _read_heatmap(src: _Source) -> np.ndarray:
    import tifffile

    geo = src.run["heatmap"]
    path = src.path / "heatmap.tif"
    try:
        with tifffile.TiffFile(path) as tif:
            data = tif.pages[0].asarray()
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ConfigError(f"{path}: cannot read the heatmap ({one_line(exc)}); re-run wsi-infer with --overwrite") from None
    if data.ndim == 3:
        data = data[..., 0]
    if list(data.shape) != list(geo.get("shape_rc", data.shape)):
        raise ConfigError(f"{path}: heatmap is {data.shape[0]}x{data.shape[1]} cells but run.json says "
                          f"{geo.get('shape_rc')}; re-run wsi-infer with --overwrite")
    return data.astype(np.float64) / 255.0


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    def cell(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if not math.isfinite(v) else f"{float(v):.6g}"
        return str(v)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(v) for v in row])
    write_text_atomic(path, buf.getvalue())


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def evaluate_results(results: str | os.PathLike[str], annotations: str | os.PathLike[str],
                     out: str | os.PathLike[str] | None = None, config: EvalConfig = EvalConfig()) -> EvalReport:
    """Evaluate ``wsi-infer`` results (or Camelyon16 detection CSVs) against annotations.

    Parameters
    ----------
    results : path
        A ``wsi-infer`` output folder (``<stem>/heatmap.tif`` + ``run.json`` per finished slide)
        and/or a folder of ``<stem>.csv`` detection files (``prob,x,y``, level-0 px).
    annotations : path
        Ground truth by slide stem: ``<stem>.xml`` (ASAP; tumour groups ``_0``, ``_1``, ``Tumor``
        minus ``_2``/``Exclusion``), ``<stem>.geojson``, or a mask TIFF ``<stem>_mask.tif`` /
        single-channel ``<stem>.tif``. A slide without one (or without tumour in it) is normal.
    out : path or None
        Output folder (default ``RESULTS/eval``). Written (each atomically): ``metrics.json``,
        ``slides.csv``, ``froc.csv``, ``froc.png``, ``roc.png``, ``detections/<stem>.csv``.

    Raises
    ------
    ConfigError
        No results found, unreadable heatmap, bad settings.
    AnnotationError, DetectionFileError
        Malformed ground truth or detection file.
    """
    results, annotations = Path(results), Path(annotations)
    out = Path(out) if out is not None else results / "eval"
    if not annotations.is_dir():
        raise ConfigError(f"--annotations {annotations} is not a folder; pass the folder of <slide>.xml files")
    sources = _find_sources(results)
    if not sources:
        raise ConfigError(f"no results in {results}: expected wsi-infer slide folders (<stem>/run.json + heatmap.tif) "
                          "or <stem>.csv detection files")
    index = {p.name.casefold(): p for p in sorted(annotations.iterdir()) if p.is_file()}
    (out / "detections").mkdir(parents=True, exist_ok=True)
    score_fn = SLIDE_SCORES[config.slide_score]
    rows: list[SlideEval] = []
    matches: list[SlideMatch] = []
    used_annotations: set[Path] = set()
    synthetic = False
    for src in sources:
        if src.kind == "heatmap":
            run = src.run
            geo, slide = run["heatmap"], run.get("slide", {})
            prob = _read_heatmap(src)
            l0_mpp = float(geo.get("l0_mpp") or slide["mpp"])
            detections = detections_from_heatmap(prob, float(geo["cell_l0"]), l0_mpp=l0_mpp,
                                                 nms_radius_um=config.nms_radius_um, min_prob=config.min_prob,
                                                 origin_l0=tuple(geo.get("origin_l0", (0, 0))))
            score = score_fn(prob)
            l0_size = tuple(int(v) for v in slide["level0_size"]) if slide.get("level0_size") else None
            slide_path = Path(slide["path"]) if slide.get("path") else None
            synthetic = synthetic or bool(run.get("synthetic"))
        else:
            detections = read_detections_csv(src.path)
            score = score_fn(detections[:, 0])
            l0_mpp, l0_size, slide_path = None, None, None
        ann = _find_annotation(index, src.stem, slide_path)
        if ann is not None:
            used_annotations.add(ann)
        is_tumor, mask, l0_mpp = _slide_truth(ann, l0_size=l0_size, l0_mpp=l0_mpp, config=config,
                                               detections=detections)
        match = match_detections(detections, mask)
        matches.append(match)
        write_detections_csv(out / "detections" / f"{src.stem}.csv", detections)
        rows.append(SlideEval(slide=src.stem, source=src.kind, truth="tumor" if is_tumor else "normal",
                              score=float(score), n_detections=match.n_detections, n_fp=match.n_fp,
                              n_lesions=match.n_lesions, lesions_found=match.n_found, lesions_missed=match.n_missed,
                              n_itc=match.n_itc, itc_hits=match.n_itc_hits, l0_mpp=float(l0_mpp),
                              annotation=ann.name if ann else ""))
        log.info("%s: %s, %d detections, %d/%d lesions found, %d FP", src.stem, rows[-1].truth, match.n_detections,
                 match.n_found, match.n_lesions, match.n_fp)
    stems = {s.stem.casefold() for s in sources}
    unmatched = sorted(p.name for p in index.values()
                       if p not in used_annotations and p.suffix.lower() in (".xml", ".geojson", ".tif", ".tiff")
                       and not any(p.name.casefold() == pat.format(s) for s in stems for pat in _ANNOTATION_PATTERNS))
    if unmatched:
        log.warning("annotations without results (not evaluated): %s", ", ".join(unmatched))

    result = froc_curve(matches)
    scores = [r.score for r in rows]
    truths = [r.truth == "tumor" for r in rows]
    auc = slide_auc(scores, truths)
    prefix = "SYNTHETIC - " if synthetic else ""
    files = {
        "metrics": out / "metrics.json",
        "slides": out / "slides.csv",
        "froc_curve": out / "froc.csv",
        "froc_plot": out / "froc.png",
        "roc_plot": out / "roc.png",
        "detections": out / "detections",
    }
    _write_csv(files["slides"], SLIDE_COLUMNS, ([getattr(r, c) for c in SLIDE_COLUMNS] for r in rows))
    _write_csv(files["froc_curve"], ("threshold", "avg_fps", "sensitivity"),
               zip([*result.thresholds.tolist(), ""], result.avg_fps.tolist(), result.sensitivity.tolist()))
    plot_froc(result, files["froc_plot"], title=f"{prefix}FROC {result.score:.3f}: {result.n_slides} slides, "
                                                f"{result.n_lesions} lesions")
    plot_roc(scores, truths, files["roc_plot"], title=f"{prefix}slide-level ROC (score: {config.slide_score})")
    n_tumor = sum(truths)
    metrics = {
        "froc": _finite_or_none(result.score),
        "sensitivities": {f"{t:g}": _finite_or_none(s) for t, s in zip(result.targets, result.sensitivities)},
        "slide_auc": _finite_or_none(auc),
        "n_slides": len(rows),
        "n_tumor_slides": n_tumor,
        "n_normal_slides": len(rows) - n_tumor,
        "n_lesions": result.n_lesions,
        "n_lesions_found": result.n_found,
        "n_itc_excluded": result.n_itc,
        "n_detections": result.n_detections,
        "n_false_positives": result.n_fp,
        "slide_score": config.slide_score,
        "synthetic": synthetic,
        "settings": config.to_dict(),
        "rules": {
            "evaluation_level": config.level,
            "dilation_um": DILATION_UM / 2,
            "itc_major_axis_um": ITC_MAJOR_AXIS_UM,
            "target_fps": list(TARGET_FPS),
            "l0_mpp": "the slide's own (run.json; --mpp or mask tags or 0.243 for detection CSVs)",
            "score_pick": "first curve point with avg FPs >= target, else the last (CAMELYON16 data-release rule)",
        },
        "annotations_without_results": unmatched,
        "files": {k: str(v) for k, v in files.items()},
    }
    write_json_atomic(files["metrics"], metrics)
    return EvalReport(froc=result, slide_auc=auc, slides=tuple(rows), metrics=metrics, files=files)


def format_summary(report: EvalReport) -> str:
    """A few human-readable lines about an :class:`EvalReport`."""
    m, r = report.metrics, report.froc

    def f(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"

    sens = " ".join(f"{lbl}:{f(s)}" for lbl, s in zip(("1/4", "1/2", "1", "2", "4", "8"), r.sensitivities))
    lines = [
        f"{'SYNTHETIC - ' if m['synthetic'] else ''}{m['n_slides']} slides ({m['n_tumor_slides']} tumour, "
        f"{m['n_normal_slides']} normal); {m['n_lesions']} lesions ({m['n_itc_excluded']} ITC excluded); "
        f"{m['n_detections']} detections",
        f"FROC {f(r.score)}  (sensitivity at FP/slide {sens}); lesions found {r.n_found}/{r.n_lesions}, "
        f"false positives {r.n_fp}",
        f"slide AUC {f(report.slide_auc)}  (slide score: {m['slide_score']})",
        f"wrote {report.files['metrics'].parent}: metrics.json, slides.csv, froc.csv, froc.png, roc.png, detections/",
    ]
    if m["annotations_without_results"]:
        lines.append(f"warning: annotations without results: {', '.join(m['annotations_without_results'])}")
    return "\n".join(lines)
