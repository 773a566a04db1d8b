"""Power and interval-width calculations for small AUC comparisons (binormal simulation)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lymphdx.core.errors import LymphdxError
from lymphdx.stats import power
from lymphdx.stats.metrics import delong, delong_paired
from lymphdx.stats.power import (
    analytic_patients_for_power,
    auc_ci_halfwidth,
    binormal_scores,
    delong_paired_rows,
    delong_rows,
    estimate_rho,
    paired_power,
    patients_for_power,
    simulate_auc_ci_width,
)


def _within_class_corr(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of class-centred scores pooled over rows and classes."""

    def centred(s: np.ndarray) -> np.ndarray:
        parts = [s[:, y == c] - s[:, y == c].mean(axis=1, keepdims=True) for c in (0, 1)]
        return np.concatenate([p.ravel() for p in parts])

    return float(np.corrcoef(centred(a), centred(b))[0, 1])


def test_binormal_scores_match_target_aucs_and_correlation() -> None:
    y, a, b = binormal_scores(np.random.default_rng(1), 1500, 2000, 0.81, 0.86, 0.6, 8)
    assert y.shape == (3500,) and a.shape == b.shape == (8, 3500)
    assert int(y.sum()) == 1500
    assert delong_rows(y, a)[0].mean() == pytest.approx(0.81, abs=0.01)
    assert delong_rows(y, b)[0].mean() == pytest.approx(0.86, abs=0.01)
    assert _within_class_corr(y, a, b) == pytest.approx(0.6, abs=0.02)
    # unit variance within class, negatives centred on 0
    assert a[:, y == 0].mean() == pytest.approx(0.0, abs=0.02)
    assert a[:, y == 1].std() == pytest.approx(1.0, abs=0.02)


def test_binormal_scores_extend_with_more_patients() -> None:
    """Common random numbers: a larger sample from the same seed extends the smaller one."""
    y1, a1, _ = binormal_scores(np.random.default_rng(5), 4, 6, 0.8, 0.8, 0.5, 3)
    y2, a2, _ = binormal_scores(np.random.default_rng(5), 7, 9, 0.8, 0.8, 0.5, 3)
    np.testing.assert_array_equal(a1[:, :4], a2[:, :4])
    np.testing.assert_array_equal(a1[:, 4:], a2[:, 7:13])


@pytest.mark.parametrize("tied", [False, True])
def test_vectorised_delong_equals_delong_paired_row_by_row(tied: bool) -> None:
    rng = np.random.default_rng(2)
    y = rng.permutation(np.r_[np.ones(9, dtype=int), np.zeros(14, dtype=int)])
    a = rng.normal(size=(6, 23)) + 1.2 * y
    b = 0.5 * a + rng.normal(size=(6, 23)) + 0.4 * y
    if tied:  # rating-scale scores with many ties
        a, b = np.round(a), np.round(b)
    delta, se, p = delong_paired_rows(y, a, b)
    auc_rows, var_rows = delong_rows(y, a)
    for r in range(6):
        ref = delong_paired(y, a[r], b[r])
        assert delta[r] == pytest.approx(ref.delta, abs=1e-12)
        assert se[r] == pytest.approx(ref.se, abs=1e-12)
        assert p[r] == pytest.approx(ref.p, abs=1e-12)
        assert (auc_rows[r], var_rows[r]) == pytest.approx(delong(y, a[r]), abs=1e-12)


def test_type_one_error_is_near_alpha() -> None:
    """Equal true AUCs: the fraction of significant paired tests is ≈ alpha."""
    rate = paired_power(50, 50, 0.8, 0.8, rho=0.6, alpha=0.05, n_sim=4000, seed=3)
    assert abs(rate - 0.05) < 0.015  # MC s.e. 0.0034; DeLong is slightly conservative here


def test_power_tends_to_one_and_grows_with_n() -> None:
    assert paired_power(200, 200, 0.70, 0.90, rho=0.6, n_sim=400) > 0.99
    powers = [paired_power(n, n, 0.75, 0.85, rho=0.6, n_sim=600) for n in (10, 20, 40, 80, 160)]
    assert all(x <= y for x, y in zip(powers, powers[1:], strict=False))
    assert powers[0] < 0.3 and powers[-1] > 0.95


def test_paper_case_has_almost_no_power() -> None:
    """Table I: 10 positive + 13 negative test patients, AUC 0.81 vs 0.86."""
    power = paired_power(10, 13, 0.86, 0.81, rho=0.6, n_sim=2000)
    assert power < 0.10  # ≈ 0.05: hardly above the false-positive rate


def test_hanley_mcneil_example() -> None:
    """Hanley & McNeil (1982): CT ratings of 51 abnormal and 58 normal, A = 0.8932, SE 0.0304."""
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    x = np.repeat(np.arange(5), abnormal)
    z = np.repeat(np.arange(5), normal)
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    assert psi.mean() == pytest.approx(0.8932, abs=1e-4)
    q1, q2 = float(np.mean(psi.mean(axis=0) ** 2)), float(np.mean(psi.mean(axis=1) ** 2))
    exact = auc_ci_halfwidth(51, 58, 0.8932, q1=q1, q2=q2)
    assert exact == pytest.approx(1.96 * 0.0304, rel=0.02)  # Q1, Q2 from their data
    approx = auc_ci_halfwidth(51, 58, 0.8932)
    assert approx == pytest.approx(1.96 * 0.0304, rel=0.08)  # exponential Q1, Q2: 0.0325
    assert auc_ci_halfwidth(51, 58, 0.8932, ci=0.90) < approx


@pytest.mark.parametrize(("n_pos", "n_neg", "auc"), [(10, 13, 0.84), (40, 60, 0.75)])
def test_simulated_delong_width_agrees_with_hanley_mcneil(
    n_pos: int, n_neg: int, auc: float
) -> None:
    width = simulate_auc_ci_width(n_pos, n_neg, auc, n_sim=1000)
    assert width == pytest.approx(2 * auc_ci_halfwidth(n_pos, n_neg, auc), rel=0.15)


def test_estimate_rho() -> None:
    y, a, b = binormal_scores(np.random.default_rng(4), 300, 400, 0.9, 0.8, 0.7, 1)
    assert estimate_rho(y, a[0], b[0]) == pytest.approx(0.7, abs=0.05)
    # class separation alone is not agreement: independent noise gives ≈ 0
    y, a, b = binormal_scores(np.random.default_rng(4), 300, 400, 0.95, 0.95, 0.0, 1)
    assert estimate_rho(y, a[0], b[0]) < 0.1
    assert estimate_rho(y, a[0], -a[0] + 3 * y) == 0.0  # negative → clipped to 0
    assert estimate_rho(y, a[0], a[0]) == 0.95  # clipped to 0.95
    assert estimate_rho(y, np.ones(700), b[0]) == 0.6  # undefined → fallback
    assert estimate_rho(y, np.stack([a[0], a[0] + 1]), b[0]) == pytest.approx(
        estimate_rho(y, a[0], b[0])
    )


def test_patients_for_power() -> None:
    n = patients_for_power(0.90, 0.80, rho=0.6, prevalence=0.45, seed=0)
    assert 40 < n < 400
    n_pos = round(0.45 * n)
    assert paired_power(n_pos, n - n_pos, 0.90, 0.80, 0.6, n_sim=2000, seed=7) > 0.75
    m = round(0.8 * n)
    assert paired_power(round(0.45 * m), m - round(0.45 * m), 0.90, 0.80, 0.6, seed=7) < 0.8
    with pytest.raises(ValueError, match="equal AUCs"):
        patients_for_power(0.8, 0.8)


@pytest.mark.parametrize(
    "auc_a, auc_b, rho, prevalence",
    [
        (0.90, 0.80, 0.6, 0.45),
        (0.70, 0.60, 0.3, 0.5),
        (0.95, 0.90, 0.8, 0.3),
        (0.86, 0.81, 0.6, 0.43),
    ],
)
def test_analytic_patient_count_is_close_to_the_simulated_one(
    auc_a: float, auc_b: float, rho: float, prevalence: float
) -> None:
    """The normal approximation against the simulation (an independent computation), in
    the AUC range where ``patients_for_power`` uses it (measured ratios 0.91–1.23)."""
    simulated = patients_for_power(auc_a, auc_b, rho, prevalence, seed=0)
    ratio = analytic_patients_for_power(auc_a, auc_b, rho, prevalence) / simulated
    assert 0.8 < ratio < 1.3


def _counting_power(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the total patient count of every simulation ``patients_for_power`` runs."""
    calls: list[int] = []
    real = power.paired_power

    def counted(n_pos: int, n_neg: int, *args: Any, **kwargs: Any) -> float:
        calls.append(n_pos + n_neg)
        return real(n_pos, n_neg, *args, **kwargs)

    monkeypatch.setattr(power, "paired_power", counted)
    return calls


def test_far_out_patient_counts_are_settled_without_simulation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ΔAUC 0.007 near 0.5 (an ablation arm): the approximation says ~130,000 patients, far
    beyond ``max_n``, so nothing is simulated. Above AUC 0.95 it is not trusted."""
    calls = _counting_power(monkeypatch)
    assert analytic_patients_for_power(0.531, 0.524, 0.0, 0.46) > 4 * 20_000
    with pytest.raises(LymphdxError, match="more than 20000 patients"):
        patients_for_power(0.531, 0.524, 0.0, 0.46)
    assert calls == []
    with pytest.raises(LymphdxError, match="more than 200 patients"):
        patients_for_power(0.999, 0.998, 0.0, 0.46, max_n=200)
    assert calls and max(calls) == 200


def test_the_shortcut_to_max_n_gives_the_full_search_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the approximation (179) exceeds ``max_n`` (170), the search tries ``max_n`` at
    once instead of doubling 16, 32, 64, 128 first; the bisection that follows (the same
    seeded simulations) ends where the full search ends."""
    calls = _counting_power(monkeypatch)
    short = patients_for_power(0.95, 0.90, 0.8, 0.3, max_n=170)
    short_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(power, "analytic_patients_for_power", lambda *a, **k: 0)
    full = patients_for_power(0.95, 0.90, 0.8, 0.3, max_n=170)
    assert short == full
    assert 128 < short <= 170
    assert short_calls[0] == 170 and calls[:4] == [16, 32, 64, 128]
    assert len(short_calls) == len(calls) - 4


def test_small_test_split_note_by_hand() -> None:
    from lymphdx.stats.power import auc_ci_halfwidth, small_test_split_note

    assert small_test_split_note(11, 12, 0.8) is None  # the demo's 23 patients: wide, not void
    note = small_test_split_note(2, 1, 0.8)
    assert note is not None and "too small" in note
    width = 2 * auc_ci_halfwidth(2, 1, 0.8)
    assert f"about {width:.2f} wide" in note
    n = int(note.split("about ")[2].split(" test patients")[0])
    pos = max(1, round(n * 2 / 3))
    assert 2 * auc_ci_halfwidth(pos, n - pos, 0.8) <= 0.2  # the size it names is enough
    assert small_test_split_note(3, 0) is not None and "both classes" in small_test_split_note(3, 0)
