"""How far a binary classifier's probabilities can be trusted: calibration and selective prediction.

Pure functions, arrays in and numbers out (no torch, no files), used by ``pcam-train`` (fitting the
package's temperature) and ``pcam-eval`` (reporting it):

- :func:`fit_temperature`, :func:`nll`, :func:`temperature_calibration`: one-parameter (temperature)
  calibration, ``softmax(logits / T)`` (Guo et al. 2017, "On calibration of modern neural
  networks"). The negative log-likelihood is convex in ``1 / T``, so a bounded 1-D search
  (scipy's ``minimize_scalar(method="bounded")``, Brent's method) on ``1 / T`` finds its one
  minimum; ``T`` is kept in [0.05, 20] (:data:`TEMPERATURE_BOUNDS`).
- :func:`expected_calibration_error`, :func:`reliability_bins`: the ECE of P(tumour) over 15
  equal-width bins of [0, 1] (bin ``k`` holds ``k/15 < p <= (k+1)/15``, bin 0 also ``p = 0``):
  ``sum_k (n_k / N) |mean p in k - fraction of tumour in k|`` (as torchmetrics'
  ``BinaryCalibrationError(norm="l1")``). ``confidence="top_label"`` bins ``max(p, 1 - p)``
  against the accuracy of the predicted label instead (Guo et al.'s ECE of the predicted class).
- :func:`binary_uncertainty`: the uncertainty of one probability: ``1 - |2p - 1|`` (1 at p = 0.5,
  0 at p = 0 or 1) or the binary entropy in bits; both rank patches the same way.
- :func:`risk_coverage`, :func:`accuracy_when_referring`, :func:`error_detection_auroc`,
  :func:`aurc`: selective prediction. Patches are referred (to a pathologist) most uncertain
  first; the accuracy on those kept is what the model is worth on the rest. Ties in uncertainty
  are broken by the patches' order (a stable sort), so equal uncertainties are referred in order.

Example (a classifier that is right where it is sure and wrong near 0.5):

>>> import numpy as np
>>> p = np.array([0.99, 0.02, 0.55, 0.45])
>>> y = np.array([1, 0, 0, 1])
>>> correct = (p >= 0.5) == (y == 1)
>>> float(error_detection_auroc(correct, binary_uncertainty(p)))
1.0
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from wsi_toolkit.errors import ConfigError

__all__ = [
    "ECE_BINS",
    "TEMPERATURE_BOUNDS",
    "REFERRAL_FRACTIONS",
    "nll",
    "fit_temperature",
    "temperature_calibration",
    "reliability_bins",
    "expected_calibration_error",
    "binary_uncertainty",
    "risk_coverage",
    "accuracy_when_referring",
    "error_detection_auroc",
    "aurc",
    "selective_report",
]

#: Equal-width bins of [0, 1] for the ECE and the reliability diagram.
ECE_BINS = 15
#: The range a fitted temperature is kept in.
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Shares of the most uncertain patches referred in the selective-prediction report.
REFERRAL_FRACTIONS = (0.05, 0.10, 0.20)


# --------------------------------------------------------------------------------------------
# Inputs


def _logits2d(logits: Any) -> np.ndarray:
    """``(N, C)`` float64 logits; a one-output model's ``(N,)`` or ``(N, 1)`` logit ``z`` as the two
    logits ``[0, z]`` (``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``)."""
    z = np.asarray(logits, np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] < 1:
        raise ConfigError(f"logits must be (N, C) or (N,); got shape {z.shape}")
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    if not np.isfinite(z).all():
        raise ConfigError("logits must be finite")
    return z


def _labels(labels: Any, n: int, n_classes: int | None = None) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if len(y) != n:
        raise ConfigError(f"{len(y)} labels for {n} predictions")
    if len(y) and not np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ConfigError("labels must be class indices (integers)")
    y = y.astype(np.int64)
    if n_classes is not None and len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise ConfigError(f"labels must be class indices in [0, {n_classes - 1}]; got {y.min()}..{y.max()}")
    return y


def _probs1d(p: Any) -> np.ndarray:
    p = np.asarray(p, np.float64).reshape(-1)
    if len(p) and (not np.isfinite(p).all() or p.min() < 0 or p.max() > 1):
        raise ConfigError("probabilities must be finite numbers in [0, 1]")
    return p


# --------------------------------------------------------------------------------------------
# Temperature scaling


def _log_softmax(z: np.ndarray) -> np.ndarray:
    from scipy.special import log_softmax

    return log_softmax(z, axis=1)


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood (natural log) of ``labels`` under ``softmax(logits / temperature)``.

    ``logits``: ``(N, C)`` (a one-output model's ``(N,)`` logit is the sigmoid's); ``labels``: ``(N,)``
    class indices.
    """
    z = _logits2d(logits)
    y = _labels(labels, len(z), z.shape[1])
    if not len(z):
        raise ConfigError("no predictions to compute a likelihood on")
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0; got {temperature!r}")
    return float(-_log_softmax(z / float(temperature))[np.arange(len(y)), y].mean())


def fit_temperature(logits: Any, labels: Any, *,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature ``T`` minimising :func:`nll` of ``softmax(logits / T)`` on ``labels``, within ``bounds``.

    The NLL is convex in ``b = 1 / T`` (a log-sum-exp of lines in ``b`` minus a line), so scipy's
    bounded Brent search on ``b`` in ``[1 / bounds[1], 1 / bounds[0]]`` (tolerance 1e-7) finds the
    minimum; where the data want a ``T`` outside ``bounds`` (e.g. perfectly separated classes want
    ``T -> 0``) the bound is returned.
    """
    from scipy.optimize import minimize_scalar

    z = _logits2d(logits)
    y = _labels(labels, len(z), z.shape[1])
    if not len(z):
        raise ConfigError("no predictions to fit a temperature on")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ConfigError(f"temperature bounds must be 0 < low < high; got {bounds!r}")
    rows = np.arange(len(y))

    def objective(b: float) -> float:
        return float(-_log_softmax(z * b)[rows, y].mean())

    res = minimize_scalar(objective, bounds=(1.0 / hi, 1.0 / lo), method="bounded",
                          options={"xatol": 1e-7, "maxiter": 500})
    b = float(res.x)
    # Brent stops within xatol of a bound without touching it; where a bound is better, it is the answer.
    for edge in (1.0 / hi, 1.0 / lo):
        if objective(edge) < objective(b):
            b = edge
    return float(min(max(1.0 / b, lo), hi))


def _softmax_col(z: np.ndarray, temperature: float, column: int) -> np.ndarray:
    return np.exp(_log_softmax(z / temperature)[:, column])


def temperature_calibration(logits: Any, labels: Any, *, fitted_on: str, tumor_index: int = 1,
                            n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Fit a temperature on ``logits``/``labels`` and describe it as the package records it::

        {"method": "temperature", "temperature": T, "fitted_on": fitted_on, "n": N,
         "fit": "...", "nll_before": ..., "nll_after": ..., "ece_before": ..., "ece_after": ...,
         "ece_bins": 15}

    ``nll_*`` at ``T = 1`` and at the fitted ``T``; ``ece_*`` of P(tumour) (column ``tumor_index``
    of the two-column logits, see :func:`nll`) on the same patches (:func:`expected_calibration_error`).
    """
    z = _logits2d(logits)
    y = _labels(labels, len(z), z.shape[1])
    t = fit_temperature(z, y)
    is_tumor = y == tumor_index
    record = {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": fitted_on,
        "n": int(len(y)),
        "fit": f"minimum NLL of softmax(logits / T), bounded Brent search on 1/T, T in "
               f"[{TEMPERATURE_BOUNDS[0]:g}, {TEMPERATURE_BOUNDS[1]:g}]",
        "nll_before": nll(z, y, 1.0),
        "nll_after": nll(z, y, t),
        "ece_before": expected_calibration_error(_softmax_col(z, 1.0, tumor_index), is_tumor, n_bins=n_bins),
        "ece_after": expected_calibration_error(_softmax_col(z, t, tumor_index), is_tumor, n_bins=n_bins),
        "ece_bins": int(n_bins),
    }
    if t in TEMPERATURE_BOUNDS:
        record["at_bound"] = True
    return record


# --------------------------------------------------------------------------------------------
# Calibration error


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``k`` holds ``k/n < p <= (k+1)/n`` (bin 0 also ``p = 0``)."""
    return np.clip(np.ceil(p * n_bins).astype(np.int64) - 1, 0, n_bins - 1)


def reliability_bins(p: Any, truth: Any, *, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per-bin counts for a reliability diagram of probabilities ``p`` (``(N,)`` in [0, 1]) against
    boolean ``truth`` (the event ``p`` is the probability of), over ``n_bins`` equal-width bins.

    Returns ``edges`` ``(n_bins + 1,)``, ``count``, ``mean_p`` and ``frac_true`` ``(n_bins,)``
    (``mean_p``/``frac_true`` are NaN in empty bins).
    """
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ConfigError(f"n_bins must be an integer >= 1; got {n_bins!r}")
    p = _probs1d(p)
    t = np.asarray(truth, bool).reshape(-1)
    if len(t) != len(p):
        raise ConfigError(f"{len(t)} truths for {len(p)} probabilities")
    k = _bin_index(p, n_bins)
    count = np.bincount(k, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(k, weights=p, minlength=n_bins) / count
        frac = np.bincount(k, weights=t.astype(np.float64), minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "mean_p": mean_p, "frac_true": frac}


def expected_calibration_error(p: Any, truth: Any, *, n_bins: int = ECE_BINS,
                               confidence: Literal["probability", "top_label"] = "probability") -> float:
    """ECE over ``n_bins`` equal-width bins of [0, 1]: ``sum_k (n_k / N) |mean p_k - frac_k|``.

    ``confidence="probability"``: ``p`` is P(event) and ``frac_k`` the fraction of ``truth`` in bin
    ``k``. ``"top_label"``: the confidence ``max(p, 1 - p)`` against whether the predicted label
    (``p >= 0.5``) equals ``truth``. NaN when there are no predictions.
    """
    p = _probs1d(p)
    t = np.asarray(truth, bool).reshape(-1)
    if len(t) != len(p):
        raise ConfigError(f"{len(t)} truths for {len(p)} probabilities")
    if not len(p):
        return float("nan")
    if confidence == "top_label":
        t = (p >= 0.5) == t
        p = np.maximum(p, 1.0 - p)
    elif confidence != "probability":
        raise ConfigError(f"confidence must be probability or top_label; got {confidence!r}")
    bins = reliability_bins(p, t, n_bins=n_bins)
    used = bins["count"] > 0
    gap = np.abs(bins["mean_p"][used] - bins["frac_true"][used])
    return float((bins["count"][used] / len(p) * gap).sum())


# --------------------------------------------------------------------------------------------
# Uncertainty and selective prediction


def binary_uncertainty(p: Any, *, kind: Literal["margin", "entropy"] = "margin") -> np.ndarray:
    """The uncertainty of probabilities ``p`` (``(N,)``, float64): ``"margin"`` ``1 - |2p - 1|``
    (closeness to 0.5: 1 at 0.5, 0 at 0 and 1) or ``"entropy"`` (binary entropy in bits, the same
    order)."""
    p = _probs1d(p)
    if kind == "margin":
        return 1.0 - np.abs(2.0 * p - 1.0)
    if kind == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
        return np.nan_to_num(h, nan=0.0)
    raise ConfigError(f"kind must be margin or entropy; got {kind!r}")


def _correct_and_uncertainty(correct: Any, uncertainty: Any) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(correct, bool).reshape(-1)
    u = np.asarray(uncertainty, np.float64).reshape(-1)
    if len(c) != len(u):
        raise ConfigError(f"{len(c)} correctness flags for {len(u)} uncertainties")
    if not np.isfinite(u).all():
        raise ConfigError("uncertainties must be finite")
    return c, u


def risk_coverage(correct: Any, uncertainty: Any) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: patches kept most certain first (ties in their order).

    Returns ``(coverage, accuracy)``, each ``(N,)``: keeping the ``k`` most certain patches
    (``coverage = k / N``, k = 1..N), ``accuracy`` is the fraction of them answered correctly
    (the risk is ``1 - accuracy``).
    """
    c, u = _correct_and_uncertainty(correct, uncertainty)
    order = np.argsort(u, kind="stable")
    k = np.arange(1, len(c) + 1)
    return k / max(len(c), 1), np.cumsum(c[order]) / k


def accuracy_when_referring(correct: Any, uncertainty: Any, fraction: float) -> float:
    """Accuracy on the patches kept when the ``fraction`` most uncertain are referred.

    ``round(fraction * N)`` patches are referred (half up), ties in uncertainty in the patches'
    order; NaN when none is kept.
    """
    c, u = _correct_and_uncertainty(correct, uncertainty)
    if not 0 <= fraction <= 1:
        raise ConfigError(f"fraction must be in [0, 1]; got {fraction!r}")
    n_keep = len(c) - int(math.floor(fraction * len(c) + 0.5))
    if n_keep <= 0:
        return float("nan")
    order = np.argsort(u, kind="stable")
    return float(c[order[:n_keep]].mean())


def error_detection_auroc(correct: Any, uncertainty: Any) -> float | None:
    """ROC AUC of ``uncertainty`` as a score for "this answer is wrong" (1: every error is more
    uncertain than every correct answer; 0.5: no better than chance). None when the answers are
    all right or all wrong."""
    from sklearn.metrics import roc_auc_score

    c, u = _correct_and_uncertainty(correct, uncertainty)
    wrong = ~c
    if not 0 < wrong.sum() < len(c):
        return None
    return float(roc_auc_score(wrong, u))


def aurc(correct: Any, uncertainty: Any) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019): the mean of ``1 - accuracy`` over
    the coverages ``k / N``; lower is better. NaN when there are no patches."""
    _, acc = risk_coverage(correct, uncertainty)
    return float((1.0 - acc).mean()) if len(acc) else float("nan")


def selective_report(correct: Any, uncertainty: Any, *,
                     fractions: tuple[float, ...] = REFERRAL_FRACTIONS) -> dict[str, Any]:
    """The selective-prediction numbers of one uncertainty: ``error_auroc``, ``aurc`` and
    ``accuracy_referring`` (``{"0.05": accuracy when 5 % are referred, ...}``; ``"0"`` = all kept)."""
    c, u = _correct_and_uncertainty(correct, uncertainty)
    acc = {f"{f:g}": _finite_or_none(accuracy_when_referring(c, u, f)) for f in (0.0, *fractions)}
    return {"error_auroc": error_detection_auroc(c, u), "aurc": _finite_or_none(aurc(c, u)),
            "accuracy_referring": acc, "n": int(len(c)), "n_errors": int((~c).sum())}


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None
