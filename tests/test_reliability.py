"""Calibration and selective-prediction metrics (wsi_toolkit.reliability) on literal arrays whose
answers are worked out by hand in the comments, and temperature fitting on logits drawn with a
known temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsi_toolkit.errors import ConfigError
from wsi_toolkit.reliability import (
    accuracy_when_referring,
    aurc,
    binary_uncertainty,
    error_detection_auroc,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    risk_coverage,
    selective_report,
    temperature_calibration,
)

# --------------------------------------------------------------------------------------------
# ECE, 15 equal-width bins of [0, 1] (width 1/15)


def test_ece_each_prediction_in_its_own_bin():
    # 0.1 -> bin 1, 0.25 -> bin 3, 0.9 -> bin 13, 0.95 -> bin 14: one per bin, so the ECE is the mean
    # |p - y| = (0.1 + 0.75 + 0.1 + 0.05) / 4 = 0.25.
    p = np.array([0.1, 0.25, 0.9, 0.95])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.25, abs=1e-12)


def test_ece_averages_within_a_bin_before_the_gap():
    # 0.30 and 0.31 share bin 4 (4/15 = 0.267 < p <= 0.333): mean p 0.305, fraction tumour 0.5,
    # ECE = |0.305 - 0.5| = 0.195 (not the per-patch mean |p - y| = 0.505).
    assert expected_calibration_error([0.30, 0.31], [1, 0]) == pytest.approx(0.195, abs=1e-12)


def test_ece_is_zero_when_each_bins_frequency_matches():
    # Ten patches at 0.7 (bin 10), seven of them tumour: mean p 0.7, fraction 0.7, gap 0.
    p = np.full(10, 0.7)
    y = np.r_[np.ones(7), np.zeros(3)]
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)


def test_top_label_ece_bins_the_confidence_of_the_predicted_class():
    # p = 0.2 and p = 0.8, both tumour. Probability ECE: bins 2 and 11, (|0.2 - 1| + |0.8 - 1|) / 2 = 0.5.
    # Top label: both have confidence 0.8 (bin 11), one right one wrong: |0.8 - 0.5| = 0.3.
    p, y = np.array([0.2, 0.8]), np.array([1, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.5, abs=1e-12)
    assert expected_calibration_error(p, y, confidence="top_label") == pytest.approx(0.3, abs=1e-12)


def test_reliability_bins_counts_and_edges():
    bins = reliability_bins([0.0, 0.05, 0.5, 1.0], [0, 0, 1, 1], n_bins=4)
    # edges 0, .25, .5, .75, 1; 0 and 0.05 -> bin 0; 0.5 -> bin 1 (0.25 < p <= 0.5); 1.0 -> bin 3
    assert bins["edges"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bins["count"].tolist() == [2, 1, 0, 1]
    assert bins["mean_p"][0] == pytest.approx(0.025) and math.isnan(bins["mean_p"][2])
    assert bins["frac_true"][[0, 1, 3]].tolist() == [0.0, 1.0, 1.0]


def test_bad_probabilities_are_refused():
    with pytest.raises(ConfigError, match="in \\[0, 1\\]"):
        expected_calibration_error([0.5, 1.5], [0, 1])
    with pytest.raises(ConfigError, match="truths"):
        expected_calibration_error([0.5], [0, 1])


# --------------------------------------------------------------------------------------------
# Uncertainty and selective prediction

CORRECT = np.array([True, False, True, True, False])
UNCERTAINTY = np.array([0.1, 0.5, 0.2, 0.0, 0.9])
# Most certain first: #3 (0.0, right), #0 (0.1, right), #2 (0.2, right), #1 (0.5, wrong), #4 (0.9, wrong)
# accuracy of the k kept: 1, 1, 1, 3/4, 3/5


def test_binary_uncertainty_margin_and_entropy():
    p = np.array([0.5, 0.0, 1.0, 0.75, 0.1])
    assert binary_uncertainty(p).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.5, 0.2])
    h = binary_uncertainty([0.5, 0.25, 0.0], kind="entropy")
    # H(0.25) = 0.25 * 2 + 0.75 * log2(4/3) = 0.5 + 0.311278 bits
    assert h.tolist() == pytest.approx([1.0, 0.811278, 0.0], abs=1e-6)


def test_risk_coverage_curve():
    coverage, accuracy = risk_coverage(CORRECT, UNCERTAINTY)
    assert coverage.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert accuracy.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.75, 0.6])
    # AURC: mean risk (0 + 0 + 0 + 0.25 + 0.4) / 5
    assert aurc(CORRECT, UNCERTAINTY) == pytest.approx(0.13)


@pytest.mark.parametrize("fraction,expected", [
    (0.0, 0.6),    # all 5 kept: 3/5
    (0.05, 0.6),   # round(0.25) = 0 referred
    (0.1, 0.75),   # round(0.5) = 1 referred (half up): 3/4
    (0.2, 0.75),   # 1 referred
    (0.4, 1.0),    # 2 referred: the two errors
    (1.0, float("nan")),
])
def test_accuracy_when_referring_the_most_uncertain(fraction, expected):
    got = accuracy_when_referring(CORRECT, UNCERTAINTY, fraction)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_error_detection_auroc():
    assert error_detection_auroc(CORRECT, UNCERTAINTY) == pytest.approx(1.0)  # both errors most uncertain
    # Error 0.5 is below correct 0.6: of the 2 x 3 (error, correct) pairs 5 are ordered right.
    assert error_detection_auroc(CORRECT, [0.6, 0.5, 0.2, 0.0, 0.9]) == pytest.approx(5 / 6)
    assert error_detection_auroc(CORRECT, np.full(5, 0.3)) == pytest.approx(0.5)  # ties: chance
    assert error_detection_auroc(CORRECT, 1 - UNCERTAINTY) == pytest.approx(0.0)
    assert error_detection_auroc([True, True], [0.1, 0.2]) is None


def test_selective_report():
    rep = selective_report(CORRECT, UNCERTAINTY, fractions=(0.2, 0.4))
    assert rep["accuracy_referring"] == pytest.approx({"0": 0.6, "0.2": 0.75, "0.4": 1.0})
    assert rep["error_auroc"] == pytest.approx(1.0) and rep["n"] == 5 and rep["n_errors"] == 2


# --------------------------------------------------------------------------------------------
# Temperature


def test_nll_by_hand():
    # logits (0, ln 3): softmax (1/4, 3/4); label 1 -> -ln(3/4)
    assert nll([[0.0, math.log(3)]], [1]) == pytest.approx(-math.log(0.75))
    # at T = 2: (0, ln(3)/2) -> p1 = sqrt(3) / (1 + sqrt(3))
    assert nll([[0.0, math.log(3)]], [1], 2.0) == pytest.approx(-math.log(math.sqrt(3) / (1 + math.sqrt(3))))
    # one output (sigmoid): the same
    assert nll(np.array([math.log(3)]), [1]) == pytest.approx(-math.log(0.75))


def _drawn(temperature: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits N(0, 3) per class; labels drawn from softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, (n, 2))
    p1 = 1.0 / (1.0 + np.exp(-(z[:, 1] - z[:, 0]) / temperature))
    return z, (rng.random(n) < p1).astype(np.int64)


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    z, y = _drawn(true_t, 20_000, seed=int(true_t * 10))
    t = fit_temperature(z, y)
    assert t == pytest.approx(true_t, rel=0.06)
    # and it is a minimum of the NLL
    assert nll(z, y, t) <= min(nll(z, y, t * 1.05), nll(z, y, t / 1.05), nll(z, y, 1.0) + 1e-12)


def test_fit_temperature_on_separable_data_stops_at_the_lower_bound():
    z = np.array([[0.0, 2.0], [0.0, -1.0], [0.0, 3.0], [0.0, -4.0]])
    y = np.array([1, 0, 1, 0])  # every logit on the right side: sharper is always better
    assert fit_temperature(z, y) == pytest.approx(0.05)


def test_temperature_calibration_record():
    z, y = _drawn(2.5, 5000, seed=3)
    rec = temperature_calibration(z, y, fitted_on="valid split, n=5000")
    assert rec["method"] == "temperature" and rec["n"] == 5000 and rec["ece_bins"] == 15
    assert rec["temperature"] == pytest.approx(2.5, rel=0.1)
    assert rec["nll_after"] < rec["nll_before"]
    assert rec["ece_after"] < rec["ece_before"]
    assert "at_bound" not in rec
