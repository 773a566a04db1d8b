"""AUC statistics checked against independent implementations and a published example."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from lymphdx.core.errors import LymphdxError
from lymphdx.stats.metrics import (
    auc,
    bootstrap_auc_ci,
    delong,
    delong_contrast,
    delong_paired,
    dice,
    dice_counts,
    dice_of,
    paired_bootstrap_delta_ci,
)


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann–Whitney by explicit pairs (ties count one half)."""
    pos, neg = s[y == 1], s[y == 0]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return total / (len(pos) * len(neg))


def _brute_delong_cov(y: np.ndarray, scores: list[np.ndarray]) -> np.ndarray:
    """DeLong et al. (1988) covariance from placement values, written with loops."""
    pos_idx = [i for i in range(len(y)) if y[i] == 1]
    neg_idx = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(pos_idx), len(neg_idx)

    def psi(a: float, b: float) -> float:
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = [[sum(psi(s[i], s[j]) for j in neg_idx) / n for i in pos_idx] for s in scores]
    v01 = [[sum(psi(s[i], s[j]) for i in pos_idx) / m for j in neg_idx] for s in scores]
    k = len(scores)
    cov = np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            a10, b10 = np.mean(v10[r]), np.mean(v10[c])
            s10 = sum((v10[r][i] - a10) * (v10[c][i] - b10) for i in range(m)) / (m - 1)
            a01, b01 = np.mean(v01[r]), np.mean(v01[c])
            s01 = sum((v01[r][j] - a01) * (v01[c][j] - b01) for j in range(n)) / (n - 1)
            cov[r, c] = s10 / m + s01 / n
    return cov


def test_hanley_mcneil_1982_published_auc() -> None:
    # Hanley & McNeil (1982), Radiology 143:29, Table 1: 5-point ratings of 109 CT images.
    normal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    abnormal = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.zeros(len(normal)), np.ones(len(abnormal))]
    s = np.r_[normal, abnormal].astype(float)
    assert round(auc(y, s), 4) == 0.8932  # the published area
    value, var = delong(y, s)
    assert math.isclose(value, 0.8932, abs_tol=5e-5)
    # Hanley–McNeil's own SE for this example is 0.0304; DeLong's nonparametric SE is close
    assert abs(math.sqrt(var) - 0.0304) < 0.004


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_delong_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(11), np.ones(9)].astype(int)
    a = np.round(y * 0.8 + rng.normal(size=20), 1)  # rounding makes ties
    b = np.round(y * 0.3 + rng.normal(size=20), 1)
    assert math.isclose(auc(y, a), _brute_auc(y, a), rel_tol=1e-12)
    cov = _brute_delong_cov(y, [a, b])
    value, var = delong(y, a)
    assert math.isclose(var, cov[0, 0], rel_tol=1e-10)
    test = delong_paired(y, a, b)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert math.isclose(test.se, se, rel_tol=1e-10)
    assert math.isclose(test.delta, _brute_auc(y, a) - _brute_auc(y, b), rel_tol=1e-12)
    assert math.isclose(test.p, 2 * stats.norm.sf(abs(test.delta / se)), rel_tol=1e-10)
    assert 0.0 < test.p <= 1.0  # a plain p, not a log


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_contrast_against_brute_force(seed: int) -> None:
    """A model against the mean AUC of three others: c' S c with S from the loops above,
    and the two-model contrast [1, -1] is delong_paired."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(9), np.ones(8)].astype(int)
    scores = [np.round(y * w + rng.normal(size=17), 1) for w in (1.0, 0.6, 0.5, 0.2)]
    c = np.array([1.0, -1 / 3, -1 / 3, -1 / 3])
    result = delong_contrast(y, np.vstack(scores), c)
    cov = _brute_delong_cov(y, scores)
    estimate = _brute_auc(y, scores[0]) - np.mean([_brute_auc(y, s) for s in scores[1:]])
    se = math.sqrt(c @ cov @ c)
    assert math.isclose(result["estimate"], estimate, rel_tol=1e-12)
    assert math.isclose(result["se"], se, rel_tol=1e-10)
    assert math.isclose(result["p"], 2 * stats.norm.sf(abs(estimate / se)), rel_tol=1e-10)
    pair = delong_contrast(y, np.vstack(scores[:2]), np.array([1.0, -1.0]))
    paired = delong_paired(y, scores[0], scores[1])
    assert math.isclose(pair["p"], paired.p, rel_tol=1e-12)
    assert pair["ci95"] == pytest.approx(list(paired.ci95), rel=1e-12)
    with pytest.raises(ValueError, match="contrast"):
        delong_contrast(y, np.vstack(scores), c[:2])


def test_identical_models_give_p_one() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    r = delong_paired(y, s, s)
    assert r.delta == 0.0 and r.p == 1.0


def test_bootstrap_ci_covers_the_auc_and_narrows_with_more_patients() -> None:
    rng = np.random.default_rng(0)

    def data(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.r_[np.zeros(n), np.ones(n)]
        return y, y + rng.normal(scale=1.2, size=2 * n)

    y, s = data(12)
    lo, hi = bootstrap_auc_ci(y, s, n=2000, seed=1)
    assert lo <= auc(y, s) <= hi
    y2, s2 = data(200)
    lo2, hi2 = bootstrap_auc_ci(y2, s2, n=2000, seed=1)
    assert (hi2 - lo2) < (hi - lo) / 2.5
    # DeLong's normal interval and the bootstrap agree roughly at n = 400
    _, var = delong(y2, s2)
    assert abs((hi2 - lo2) - 2 * 1.96 * math.sqrt(var)) < 0.03
    # same seed, same interval
    assert bootstrap_auc_ci(y, s, n=500, seed=3) == bootstrap_auc_ci(y, s, n=500, seed=3)


def test_paired_bootstrap_delta_ci_contains_the_difference() -> None:
    rng = np.random.default_rng(5)
    y = np.r_[np.zeros(30), np.ones(30)]
    a = y * 1.5 + rng.normal(size=60)
    b = y * 0.2 + rng.normal(size=60)
    lo, hi = paired_bootstrap_delta_ci(y, a, b, n=1000)
    assert lo <= auc(y, a) - auc(y, b) <= hi
    assert lo > 0  # a clear difference at this size


def test_auc_refuses_a_single_class() -> None:
    with pytest.raises(LymphdxError, match="all of one class"):
        auc(np.ones(5), np.arange(5.0))


def test_dice_hand_worked() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == 0.5
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def test_pooled_dice_sums_counts_over_volumes() -> None:
    """Volume 1: 8 + 8 voxels, 4 shared; volume 2: 2 predicted, none true. Pooled:
    2·4 / (16 + 2) = 4/9; the mean of per-volume Dice would be (0.5 + 0) / 2."""
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2], b[1:3] = True, True
    c = np.zeros((4, 4), bool)
    c[0, :2] = True
    counts = [dice_counts(a, b), dice_counts(c, np.zeros((4, 4)))]
    assert counts == [(4, 16), (0, 2)]
    assert dice_of(*np.sum(counts, axis=0)) == pytest.approx(4 / 9)
    assert dice_of(0, 0) == 1.0  # nothing predicted, nothing true
    with pytest.raises(ValueError, match="shapes differ"):
        dice_counts(np.zeros((2, 3)), np.zeros((3, 2)))


def test_binary_log_loss_hand_worked() -> None:
    from lymphdx.stats.metrics import binary_log_loss

    # −(ln 0.8 + ln 0.5) / 2; a probability of exactly 0 on a positive is clipped to 1e-7
    assert math.isclose(
        binary_log_loss(np.array([0, 1]), np.array([0.2, 0.5])),
        -(math.log(0.8) + math.log(0.5)) / 2,
        rel_tol=1e-12,
    )
    assert math.isclose(binary_log_loss(np.array([1]), np.array([0.0])), -math.log(1e-7))


def test_sensitivity_specificity_hand_worked() -> None:
    from lymphdx.stats.metrics import sensitivity_specificity

    y = np.array([1, 1, 1, 0, 0])
    pred = np.array([1, 0, 1, 0, 1])  # 2 of 3 positives, 1 of 2 negatives
    assert sensitivity_specificity(y, pred) == (2 / 3, 1 / 2)
    assert sensitivity_specificity(np.array([1, 1]), np.array([1, 0])) == (0.5, 0.0)
