"""Metrics against scikit-learn, lifelines and scikit-survival, hand-computed cases and properties."""

from __future__ import annotations

import time as clock
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index as lifelines_cindex
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score, brier_score_loss, roc_auc_score

from fedfusion.common.metrics import (
    auc,
    balanced_accuracy,
    brier_score,
    classification_report,
    concordance_index,
    expected_calibration_error,
    survival_report,
)


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _multiclass(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    return labels, _softmax(logits)


def _brute_force_cindex(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """The definition, pair by pair, to check the vectorised code on small inputs."""
    score, pairs = 0.0, 0
    for i in range(len(time)):
        for j in range(len(time)):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                pairs += 1
                score += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return score / pairs if pairs else float("nan")


# ---------------------------------------------------------------------------------------- AUC


def test_binary_auc_matches_sklearn_for_all_score_layouts() -> None:
    labels, probs = _multiclass(300, 2, seed=0)
    expected = roc_auc_score(labels, probs[:, 1])
    assert auc(labels, probs[:, 1]) == pytest.approx(expected)
    assert auc(labels, probs) == pytest.approx(expected)
    assert auc(torch.tensor(labels), torch.tensor(probs)) == pytest.approx(expected)
    names = np.where(labels == 1, "malignant", "benign")
    assert auc(names, probs[:, 1]) == pytest.approx(expected)  # larger label is positive
    assert auc(names, probs[:, 1], classes=("malignant", "benign")) == pytest.approx(1 - expected)


def test_multiclass_auc_matches_sklearn_ovr_macro() -> None:
    labels, probs = _multiclass(400, 4, seed=1)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert auc(labels, probs) == pytest.approx(expected)
    assert auc(labels, probs.astype(np.float32)) == pytest.approx(expected, abs=1e-6)
    letters = np.array(list("abcd"))[labels]
    assert auc(letters, probs, classes=list("abcd")) == pytest.approx(expected)


def test_multiclass_auc_averages_only_classes_present() -> None:
    labels, probs = _multiclass(300, 3, seed=2)
    keep = labels != 2
    labels, probs = labels[keep], probs[keep]
    expected = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in (0, 1)])
    assert auc(labels, probs) == pytest.approx(expected)


def test_auc_is_nan_without_warning_for_one_class() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(auc([1, 1, 1], [0.2, 0.5, 0.9]))
        assert np.isnan(auc([0, 0], [[0.9, 0.1], [0.3, 0.7]]))
        assert np.isnan(auc([2, 2, 2], _multiclass(3, 3, seed=0)[1]))
        assert np.isnan(auc([], []))


def test_auc_hand_cases_and_errors() -> None:
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="not in classes"):
        auc([0, 1, 3], _multiclass(3, 3, seed=0)[1])
    with pytest.raises(ValueError, match="non-finite"):
        auc([0, 1], [0.3, np.nan])
    with pytest.raises(ValueError, match="expected \\(3,\\)"):
        auc([0, 1, 1], [0.3, 0.4])


# ---------------------------------------------------------------------- accuracy and calibration


def test_balanced_accuracy_matches_sklearn() -> None:
    labels, probs = _multiclass(500, 3, seed=3)
    predicted = probs.argmax(axis=1)
    assert balanced_accuracy(labels, predicted) == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert balanced_accuracy([0] * 9 + [1], [0] * 10) == 0.5  # always "benign": 90 % accurate, useless
    assert np.isnan(balanced_accuracy([], []))


def test_brier_matches_sklearn_binary_and_multiclass() -> None:
    labels, probs = _multiclass(300, 2, seed=4)
    assert brier_score(labels, probs[:, 1]) == pytest.approx(brier_score_loss(labels, probs[:, 1]))
    assert brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs[:, 1]))
    labels, probs = _multiclass(300, 4, seed=5)
    assert brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs, labels=range(4)))
    assert brier_score([0, 1, 2], np.eye(3)) == 0.0
    assert brier_score([0, 1], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]) == 2.0


def test_ece_hand_computed() -> None:
    # bin [0, .5): mean p .25 vs positive rate .5; bin [.5, 1]: mean p .75 vs rate 1 -> .125 + .125
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.4, 0.6, 0.9], n_bins=2) == pytest.approx(0.25)
    assert expected_calibration_error([0, 1], [0.0, 1.0]) == 0.0
    assert expected_calibration_error([1, 0], [0.0, 1.0]) == 1.0
    # Multiclass top label: confidences .8 (right) and .6 (wrong) -> (|.8-1| + |.6-0|) / 2
    probs = [[0.8, 0.1, 0.1], [0.2, 0.6, 0.2]]
    assert expected_calibration_error([0, 2], probs, n_bins=10) == pytest.approx(0.4)


def test_ece_matches_sklearn_calibration_curve_and_is_small_when_calibrated() -> None:
    rng = np.random.default_rng(6)
    probs = rng.uniform(size=20_000)
    labels = (rng.uniform(size=20_000) < probs).astype(int)
    rate, mean_p = calibration_curve(labels, probs, n_bins=10, strategy="uniform")
    counts = np.histogram(probs, bins=10, range=(0, 1))[0]
    expected = np.sum(np.abs(rate - mean_p) * counts[counts > 0]) / len(probs)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)
    assert expected_calibration_error(labels, probs) < 0.02
    assert expected_calibration_error(labels, probs**3) > 0.1  # overconfident in the negative class


def test_classification_report_is_consistent() -> None:
    labels, probs = _multiclass(200, 3, seed=7)
    report = classification_report(labels, probs)
    assert set(report) == {"auc", "balanced_accuracy", "ece", "brier", "accuracy"}
    assert report["auc"] == pytest.approx(auc(labels, probs))
    assert report["accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == labels))
    assert all(isinstance(value, float) for value in report.values())
    binary = classification_report([0, 1, 1, 0], [0.2, 0.7, 0.4, 0.6])
    assert binary["accuracy"] == 0.5 and binary["auc"] == 0.75


def test_classification_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="class indices 0..1"):
        brier_score([0, 2], [0.1, 0.9])
    with pytest.raises(ValueError, match="probabilities"):
        expected_calibration_error([0, 1], [-0.1, 1.2])
    with pytest.raises(ValueError, match="y_true has 3 values but"):
        balanced_accuracy([0, 1, 1], [0, 1])


# ------------------------------------------------------------------------------------ C-index


def test_cindex_hand_cases() -> None:
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([1, 1, 1, 0])
    assert concordance_index(time, event, [4, 3, 2, 1]) == 1.0  # highest risk died first
    assert concordance_index(time, event, [1, 2, 3, 4]) == 0.0
    assert concordance_index(time, event, [7, 7, 7, 7]) == 0.5
    assert np.isnan(concordance_index(time, [0, 0, 0, 0], [4, 3, 2, 1]))  # no events, no pairs
    assert np.isnan(concordance_index([5.0, 5.0], [1, 1], [1, 2]))  # tied event times: not comparable
    # An event and a censoring at the same time are comparable: the censored patient lived at least as long.
    assert concordance_index([5.0, 5.0], [1, 0], [2, 1]) == 1.0


def test_cindex_matches_lifelines_with_ties() -> None:
    rng = np.random.default_rng(8)
    for _ in range(5):
        n = 300
        time = rng.integers(1, 40, n).astype(float)  # many tied times
        event = rng.uniform(size=n) < 0.6
        risk = rng.integers(0, 15, n).astype(float)  # many tied risks
        ours = concordance_index(time, event, risk)
        assert ours == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-12)
        assert ours == pytest.approx(_brute_force_cindex(time, event, risk), abs=1e-12)


def test_cindex_matches_scikit_survival() -> None:
    sksurv_metrics = pytest.importorskip("sksurv.metrics")
    rng = np.random.default_rng(9)
    time = rng.integers(1, 30, 400).astype(float)
    event = rng.uniform(size=400) < 0.5
    risk = np.round(rng.normal(size=400), 1)
    expected = sksurv_metrics.concordance_index_censored(event, time, risk)[0]
    assert concordance_index(time, event, risk) == pytest.approx(expected, abs=1e-12)


def test_cindex_is_quick_at_10k() -> None:
    rng = np.random.default_rng(10)
    n = 10_000
    time = rng.exponential(10.0, n).round(1)
    event = rng.uniform(size=n) < 0.7
    risk = -np.log(time + 1) + rng.normal(size=n)
    start = clock.perf_counter()
    ours = concordance_index(time, event, risk)
    elapsed = clock.perf_counter() - start
    assert ours == pytest.approx(lifelines_cindex(time, -risk, event), abs=1e-12)
    assert ours > 0.6
    assert elapsed < 5.0, f"C-index on n=10,000 took {elapsed:.1f} s"


def test_survival_report_and_input_checks() -> None:
    report = survival_report([1, 2, 3], [1, 0, 1], torch.tensor([3.0, 2.0, 1.0]))
    assert report == {"c_index": 1.0, "n": 3, "events": 2}
    with pytest.raises(ValueError, match="risk has 1 non-finite"):
        concordance_index([1, 2], [1, 1], [0.5, np.nan])
    with pytest.raises(ValueError, match="expected 1 \\(event\\) or 0"):
        concordance_index([1, 2], [1, 2], [0.5, 0.1])
    with pytest.raises(ValueError, match="time has 2 values but risk has 3"):
        concordance_index([1, 2], [1, 1], [0.5, 0.1, 0.3])


_sizes = st.integers(min_value=2, max_value=30)


@st.composite
def _survival(draw: st.DrawFn, unique_risk: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = draw(_sizes)
    time = np.array(draw(st.lists(st.integers(1, 10), min_size=n, max_size=n)), dtype=float)
    event = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if unique_risk:
        values = draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n, unique=True))
        risk = np.array(values, dtype=float)
    else:
        risk = np.array(draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)), dtype=float)
    return time, event, risk


@settings(max_examples=150, deadline=None)
@given(_survival())
def test_cindex_property_range_and_definition(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    time, event, risk = data
    value = concordance_index(time, event, risk)
    reference = _brute_force_cindex(time, event, risk)
    if np.isnan(reference):
        assert np.isnan(value)
    else:
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(reference, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(_survival(unique_risk=True))
def test_cindex_property_negated_risk_is_complement(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    time, event, risk = data
    forward, backward = concordance_index(time, event, risk), concordance_index(time, event, -risk)
    if not np.isnan(forward):
        assert forward + backward == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(_survival())
def test_cindex_property_monotone_transform_invariant(data: tuple[np.ndarray, ...]) -> None:
    time, event, risk = data
    value = concordance_index(time, event, risk)
    for transformed in (risk**3 + 2 * risk, np.exp(risk / 7.0), 3.0 * risk - 5.0):
        np.testing.assert_equal(concordance_index(time, event, transformed), value)


def test_bootstrap_interval_of_a_c_index_holds_the_estimate_and_narrows_with_more_patients() -> None:
    from fedfusion.common.metrics import concordance_index, metric_interval

    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        risk = rng.normal(size=n)
        time = np.exp(-risk + rng.normal(size=n))  # higher risk, earlier event: C-index well above 0.5
        event = (rng.random(n) < 0.7).astype(int)
        ci = metric_interval("c_index", time=time, event=event, risk=risk, seed=1)
        assert ci["c_index_ci_low"] < concordance_index(time, event, risk) < ci["c_index_ci_high"]
        widths.append(ci["c_index_ci_high"] - ci["c_index_ci_low"])
    assert widths[1] < widths[0] / 2
    assert metric_interval("c_index", time=time, event=np.zeros(400, dtype=int), risk=risk) == {
        "c_index_ci_low": pytest.approx(float("nan"), nan_ok=True),
        "c_index_ci_high": pytest.approx(float("nan"), nan_ok=True)}  # no events: undefined, not an error
    assert metric_interval("auc", time=time) == {}


def test_bootstrap_interval_of_an_auc_skips_single_class_resamples() -> None:
    from fedfusion.common.metrics import auc, metric_interval

    labels = np.array([0] * 18 + [1] * 2)  # rare positives: some resamples draw none
    probs = np.linspace(0.05, 0.95, 20)
    ci = metric_interval("auc", labels=labels, probs=probs, seed=3)
    assert 0.5 < ci["auc_ci_low"] <= auc(labels, probs) <= ci["auc_ci_high"] <= 1.0
