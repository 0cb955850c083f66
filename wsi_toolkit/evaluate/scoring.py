"""Matching detections to lesions, the FROC curve and score, and the slide-level ROC AUC.

Rules 3 to 5 of ``docs/camelyon16.md``: a lesion keeps its best detection, label 0 is a false
positive, ITC hits are ignored; the score is the mean sensitivity at 1/4..8 average false positives
per slide, picked by the CAMELYON16 data-release rule (no interpolation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.evaluate.detections import _check_detections
from wsi_toolkit.evaluate.mask import EvaluationMask

__all__ = ["TARGET_FPS", "SLIDE_SCORES", "SlideMatch", "FrocResult", "match_detections", "froc_curve", "froc",
           "sensitivities_at", "slide_auc"]

log = logging.getLogger(__name__)

#: Average false positives per slide at which the FROC score averages the sensitivity.
TARGET_FPS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

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
    """Classify one slide's detections (rule 3 of ``docs/camelyon16.md``).

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
        Sensitivity at each of :attr:`targets` average FPs per slide (rule 5 of ``docs/camelyon16.md``).
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


def sensitivities_at(avg_fps: Sequence[float] | np.ndarray, sensitivity: Sequence[float] | np.ndarray,
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
    """The FROC curve and score of matched slides (rules 4 and 5 of ``docs/camelyon16.md``).

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
    Every rule: ``docs/camelyon16.md``.
    """
    return froc_curve([match_detections(det, mask) for det, mask in slides], targets=targets)


def slide_auc(scores: Sequence[float] | np.ndarray, truths: Sequence[bool] | np.ndarray) -> float:
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
