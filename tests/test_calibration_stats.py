"""Calibration maps and statistics (``lymphdx.stats.calibration``) and the operating point
(``lymphdx.stats.operating_point``), checked against scikit-learn, scipy and hand-worked
cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from lymphdx.stats.calibration import (
    Recalibration,
    calibration_stats,
    cross_fitted,
    ece,
    fit_recalibration,
    logistic_fit,
    logit,
    reliability_bins,
    small_set_warning,
    wilson_interval,
)
from lymphdx.stats.operating_point import at_threshold, choose_threshold


def _miscalibrated(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from true risks and an overconfident score of them (slope 1/2.5)."""
    rng = np.random.default_rng(seed)
    true_logit = rng.normal(-0.3, 1.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(int)
    p = 1 / (1 + np.exp(-(2.5 * true_logit + 0.8)))
    return y, p


def test_wilson_interval_by_hand() -> None:
    # 8/10: centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half-width 1.96·√(0.016 + 1.96²/400) / same
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    z = 1.959963984540054
    centre = (0.8 + z**2 / 20) / (1 + z**2 / 10)
    half = z * np.sqrt(0.8 * 0.2 / 10 + z**2 / 400) / (1 + z**2 / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0, 5)[0] == 0.0
    assert all(np.isnan(wilson_interval(0, 0)))


def test_slope_matches_sklearn_and_intercept_matches_a_direct_likelihood() -> None:
    y, p = _miscalibrated()
    z = logit(p)
    a, b = logistic_fit(z, y)[0]
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(z[:, None], y)
    assert a == pytest.approx(ref.intercept_[0], abs=1e-6)
    assert b == pytest.approx(ref.coef_[0, 0], abs=1e-6)
    assert b < 0.6  # the score is overconfident: slope well below 1

    def nll(t: np.ndarray) -> float:  # logit p as an offset: only the intercept is free
        eta = z + t[0]
        return float(np.sum(np.logaddexp(0, eta) - y * eta))

    direct = optimize.minimize(nll, [0.0], method="Nelder-Mead", options={"xatol": 1e-10})
    assert logistic_fit(z, y, offset=z, slope=False)[0, 0] == pytest.approx(direct.x[0], abs=1e-6)


def test_perfectly_calibrated_groups_by_hand() -> None:
    # p = 0.2 with 1 positive in 5, p = 0.8 with 4 in 5: the saturated fit is the identity
    p = np.array([0.2] * 5 + [0.8] * 5)
    y = np.array([1, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    st = calibration_stats(y, p, n_boot=200, seed=1)
    assert st["intercept"] == pytest.approx(0.0, abs=1e-8)
    assert st["slope"] == pytest.approx(1.0, abs=1e-8)
    # Brier by hand: per group 1·0.8² + 4·0.2² = 0.8, twice, over 10
    assert st["brier"] == pytest.approx(0.16)
    assert st["brier"] == pytest.approx(brier_score_loss(y, p))
    assert st["ece"] == pytest.approx(0.0, abs=1e-12)
    bins = st["reliability"]
    assert [b["n"] for b in bins] == [0, 5, 0, 0, 5]  # equal-width fifths; 0.2 is in [0.2, 0.4)
    assert bins[4]["observed"] == 0.8
    assert bins[4]["observed_ci95"] == pytest.approx(list(wilson_interval(4, 5)))
    # many of 10 patients' resamples leave a group all positive: the slope is then infinite
    assert st["slope_ci95"] == [None, None]
    wide = calibration_stats(*_miscalibrated(), n_boot=300, seed=2)
    for key in ("intercept", "slope", "brier", "ece"):
        lo, hi = wide[f"{key}_ci95"]
        assert lo < wide[key] < hi


def test_ece_by_hand() -> None:
    # bin [0.2, 0.4): p 0.3, 0.3 with 0 positive -> gap 0.3; bin [0.8, 1]: 0.9, 0.9, 1 of 2 ->
    # gap 0.4; ECE = (2·0.3 + 2·0.4) / 4
    assert ece([0, 0, 1, 0], [0.3, 0.3, 0.9, 0.9]) == pytest.approx(0.35)
    assert reliability_bins([0, 1], [0.0, 1.0])[4]["n"] == 1  # 1.0 falls in the last bin


def test_platt_matches_sklearn_and_keeps_auc() -> None:
    y, p = _miscalibrated()
    fitted = fit_recalibration("platt", y, p)
    assert fitted.method == "platt" and fitted.params["b"] > 0
    try:  # scikit-learn's own Platt fit (private, so only when it is there)
        from sklearn.calibration import _sigmoid_calibration
    except ImportError:  # pragma: no cover
        pass
    else:
        a_sk, b_sk = _sigmoid_calibration(logit(p), y)  # p' = 1 / (1 + exp(a·f + b))
        assert fitted.params["b"] == pytest.approx(-a_sk, rel=1e-4)
        assert fitted.params["a"] == pytest.approx(-b_sk, rel=1e-4, abs=1e-5)
    q = fitted(p)
    assert abs(roc_auc_score(y, q) - roc_auc_score(y, p)) < 1e-12
    before, after = calibration_stats(y, p, 200), calibration_stats(y, q, 200)
    assert abs(after["slope"] - 1) < 0.05 and abs(after["intercept"]) < 0.05  # in-sample
    assert after["brier"] < before["brier"]
    assert Recalibration.from_json(fitted.to_json())(p) == pytest.approx(q)


def test_platt_refuses_a_reversed_score_and_one_class() -> None:
    y, p = _miscalibrated()
    reversed_fit = fit_recalibration("platt", y, 1 - p)
    assert reversed_fit.method == "none" and "not positive" in reversed_fit.note
    assert reversed_fit(p) == pytest.approx(p)
    one = fit_recalibration("isotonic", np.zeros(5), np.linspace(0.1, 0.5, 5))
    assert one.method == "none" and "one class" in one.note


def test_isotonic_is_sklearns_and_monotone() -> None:
    from sklearn.isotonic import IsotonicRegression

    y, p = _miscalibrated(80, seed=3)
    fitted = fit_recalibration("isotonic", y, p)
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    grid = np.linspace(0, 1, 101)
    assert fitted(grid) == pytest.approx(ref.predict(grid), abs=1e-12)
    assert np.all(np.diff(fitted(np.sort(p))) >= 0)


def test_separated_slope_is_undefined() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    st = calibration_stats(y, np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8]), n_boot=100)
    assert st["slope"] is None  # the classes are separated: the MLE is infinite
    assert st["brier"] == pytest.approx(brier_score_loss(y, [0.1, 0.2, 0.3, 0.6, 0.7, 0.8]))


def test_cross_fitting_never_uses_a_patients_own_group() -> None:
    y, p = _miscalibrated(120, seed=5)
    groups = np.arange(120) % 4
    q, maps = cross_fitted(y, p, groups, "platt")
    for g, fitted in enumerate(maps):
        inside = groups == g
        own = fit_recalibration("platt", y[~inside], p[~inside])
        assert q[inside] == pytest.approx(own(p[inside]))
        assert fitted.params == own.params


def test_small_set_warning() -> None:
    assert "too small to trust" in small_set_warning(19, 40)
    assert small_set_warning(20, 20) is None


def test_operating_point_targets_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9])
    # sensitivity ≥ 0.8: p ≥ 0.6 catches 4 of 5; the largest such threshold is 0.6
    sens = choose_threshold(y, p, {"sensitivity": 0.8})
    assert (sens["threshold"], sens["sensitivity"], sens["specificity"]) == (0.6, 0.8, 1.0)
    # sensitivity 1.0 needs 0.45
    assert choose_threshold(y, p, {"sensitivity": 1.0})["threshold"] == 0.45
    # specificity 1.0: the smallest threshold above every negative, 0.6; specificity 0.8
    # allows one negative above it: 0.45 (sensitivity 1)
    spec = choose_threshold(y, p, {"specificity": 1.0})
    assert (spec["threshold"], spec["specificity"]) == (0.6, 1.0)
    spec = choose_threshold(y, p, {"specificity": 0.8})
    assert (spec["threshold"], spec["sensitivity"], spec["specificity"]) == (0.45, 1.0, 0.8)
    # Youden: at 0.6 J = 0.8 + 1 − 1 = 0.8; at 0.45 J = 1 + 0.8 − 1 = 0.8: the larger, 0.6
    assert choose_threshold(y, p, "youden")["threshold"] == 0.6
    point = at_threshold(y, p, 0.6)
    assert (point["tp"], point["fn"], point["tn"], point["fp"]) == (4, 1, 5, 0)
    assert point["sensitivity_ci95"] == pytest.approx(list(wilson_interval(4, 5)))
    assert at_threshold(np.zeros(3, int), p[:3], 0.5)["sensitivity"] is None
