"""How much can a small AUC table support? Interval widths, paired-test power, sample size.

The paper's Table I compares AUCs 0.81 / 0.84 / 0.82 / 0.86 on 23 test patients (10
positive, 13 negative). This module answers, under the usual binormal model:

* how wide a 95% interval around one AUC is at that size (Hanley & McNeil 1982, checked
  against the mean DeLong interval width in simulation);
* how often DeLong's paired test (two models scored on the same patients) would reach
  p < alpha at given true AUCs (power, by vectorised simulation);
* how many patients would be needed for 80% power.

The true AUCs are declared, not observed: power at the observed ΔAUC is a function of the
observed p-value and says nothing more (Hoenig & Heisey 2001). ``stats.design`` answers
the question at a declared effect in closed form; the simulations here check it.

Binormal model: scores of negatives are N(0, 1), of positives N(mu, 1) with
mu = sqrt(2)·Φ⁻¹(AUC), so that P(positive > negative) = Φ(mu / sqrt 2) = AUC. Two models
score the same patients; within each class their scores have correlation rho.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from scipy import stats

from lymphdx.core.errors import LymphdxError
from lymphdx.core.seeding import seeded_rng

__all__ = [
    "binormal_scores",
    "delong_rows",
    "delong_paired_rows",
    "auc_ci_halfwidth",
    "simulate_auc_ci_width",
    "paired_power",
    "estimate_rho",
    "patients_for_power",
    "analytic_patients_for_power",
    "paired_delta_se",
    "small_test_split_note",
]

_CHUNK = 100  # simulated tables per batch: bounds memory; fixed so draws do not depend on n
_RHO_FALLBACK = 0.6


def _check_auc(auc: float, name: str = "auc") -> float:
    auc = float(auc)
    if not 0.0 < auc < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {auc}")
    return auc


def _check_counts(n_pos: int, n_neg: int) -> tuple[int, int]:
    n_pos, n_neg = int(n_pos), int(n_neg)
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"need at least 2 positives and 2 negatives for DeLong's variance, "
            f"got {n_pos} and {n_neg}"
        )
    return n_pos, n_neg


def binormal_scores(
    rng: np.random.Generator,
    n_pos: int,
    n_neg: int,
    auc_a: float,
    auc_b: float,
    rho: float,
    n_sim: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate ``n_sim`` test sets scored by two models under the binormal model.

    Returns ``y`` ``(n,)`` (positives first, then negatives; n = n_pos + n_neg) and
    ``scores_a``, ``scores_b`` ``(n_sim, n)``. Negatives are N(0, 1), positives N(mu, 1)
    with mu = sqrt(2)·Φ⁻¹(AUC) per model; the two models' scores of one patient have
    correlation ``rho`` within each class. The draws come from two generators spawned
    from ``rng`` (one for positives, one for negatives), so that the same ``rng`` state
    with more patients extends the smaller sample (common random numbers across n).
    """
    n_pos, n_neg = int(n_pos), int(n_neg)
    mu_a = math.sqrt(2.0) * stats.norm.ppf(_check_auc(auc_a, "auc_a"))
    mu_b = math.sqrt(2.0) * stats.norm.ppf(_check_auc(auc_b, "auc_b"))
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [-1, 1], got {rho}")
    pos_rng, neg_rng = rng.spawn(2)
    z = np.concatenate(
        [pos_rng.standard_normal((n_pos, n_sim, 2)), neg_rng.standard_normal((n_neg, n_sim, 2))]
    )  # (n, n_sim, 2): patient-major so extra patients append to the same draws
    e_a = z[..., 0].T
    e_b = rho * e_a + math.sqrt(max(1.0 - rho * rho, 0.0)) * z[..., 1].T
    y = np.r_[np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)]
    return y, e_a + mu_a * y, e_b + mu_b * y


def _placement_rows(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong placement values of every row of ``s`` (``(..., n)``) from mid-ranks.

    For a positive x_i, V10 = (rank among all − rank among positives) / n_neg counts the
    negatives below it (ties ½); for a negative y_j, V01 = 1 − (rank among all − rank
    among negatives) / n_pos is the fraction of positives above it (ties ½).
    """
    pos, neg = s[..., y == 1], s[..., y == 0]
    m, k = pos.shape[-1], neg.shape[-1]
    tz = stats.rankdata(np.concatenate([pos, neg], axis=-1), axis=-1)
    v10 = (tz[..., :m] - stats.rankdata(pos, axis=-1)) / k
    v01 = 1.0 - (tz[..., m:] - stats.rankdata(neg, axis=-1)) / m
    return v10, v01


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y).astype(int).ravel()
    if y.shape != (n,):
        raise ValueError(f"labels have {y.size} entries but the scores have {n} columns")
    n_pos = int(y.sum())
    if n_pos < 2 or len(y) - n_pos < 2:
        raise LymphdxError(
            f"DeLong's variance needs at least 2 positives and 2 negatives, got {n_pos} "
            f"positive of {len(y)}"
        )
    return y


def delong_rows(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUC and DeLong variance of each row of ``scores`` ``(rows, n)`` (labels ``y`` shared)."""
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    v10, v01 = _placement_rows(_labels(y, s.shape[-1]), s)
    var = (
        np.var(v10, axis=-1, ddof=1) / v10.shape[-1]
        + np.var(v01, axis=-1, ddof=1) / (v01.shape[-1])
    )
    return v10.mean(axis=-1), var


def delong_paired_rows(
    y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised DeLong paired test, row by row: ``(delta, se, p)``, each ``(rows,)``.

    Row r is the same test as ``metrics.delong_paired(y, scores_a[r], scores_b[r])``:
    var(ΔAUC) = var(V10_a − V10_b)/n_pos + var(V01_a − V01_b)/n_neg (ddof 1), two-sided
    normal p; a zero SE gives p = 1 when ΔAUC = 0 and p = 0 otherwise.
    """
    a = np.atleast_2d(np.asarray(scores_a, dtype=float))
    b = np.atleast_2d(np.asarray(scores_b, dtype=float))
    if a.shape != b.shape:
        raise ValueError(f"scores_a {a.shape} and scores_b {b.shape} differ in shape")
    y = _labels(y, a.shape[-1])
    v10, v01 = _placement_rows(y, np.stack([a, b]))
    d10, d01 = v10[0] - v10[1], v01[0] - v01[1]
    var = (
        np.var(d10, axis=-1, ddof=1) / d10.shape[-1]
        + np.var(d01, axis=-1, ddof=1) / (d01.shape[-1])
    )
    delta = d10.mean(axis=-1)
    se = np.sqrt(np.maximum(var, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2.0 * stats.norm.sf(np.abs(delta) / se)
    zero = se == 0.0
    p[zero] = np.where(delta[zero] == 0.0, 1.0, 0.0)
    return delta, se, p


def auc_ci_halfwidth(
    n_pos: int,
    n_neg: int,
    auc: float,
    ci: float = 0.95,
    *,
    q1: float | None = None,
    q2: float | None = None,
) -> float:
    """Half-width z·SE of a normal CI for one AUC, SE from Hanley & McNeil (1982).

    SE² = [A(1−A) + (n_pos−1)(Q1−A²) + (n_neg−1)(Q2−A²)] / (n_pos·n_neg), where Q1 is the
    chance that two random positives both outscore one random negative and Q2 that one
    positive outscores two negatives. Without data, Q1 = A/(2−A) and Q2 = 2A²/(1+A) (their
    exponential approximation, close to binormal for moderate AUCs); pass ``q1``/``q2``
    estimated from data for their exact expression. On their CT example (A = 0.8932, 51
    abnormal, 58 normal; published SE 0.0304) the approximation gives SE 0.0325 (+7%).
    Not clipped to [0, 1]: it measures uncertainty; clip an interval reported for a table.
    """
    var = _hanley_mcneil_var(n_pos, n_neg, _check_auc(auc), q1, q2)
    return float(stats.norm.ppf(0.5 + ci / 2.0) * math.sqrt(var))


def _hanley_mcneil_var(
    n_pos: int, n_neg: int, a: float, q1: float | None = None, q2: float | None = None
) -> float:
    """Hanley & McNeil's variance of one AUC ``a`` (see :func:`auc_ci_halfwidth`)."""
    if int(n_pos) < 1 or int(n_neg) < 1:
        raise ValueError(f"need positives and negatives, got {n_pos} and {n_neg}")
    q1 = a / (2.0 - a) if q1 is None else float(q1)
    q2 = 2.0 * a * a / (1.0 + a) if q2 is None else float(q2)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return max(var, 0.0)


def _chunks(n_sim: int) -> Iterator[int]:
    if n_sim < 1:
        raise ValueError(f"n_sim must be at least 1, got {n_sim}")
    full, rest = divmod(int(n_sim), _CHUNK)
    yield from [_CHUNK] * full + ([rest] if rest else [])


def simulate_auc_ci_width(
    n_pos: int, n_neg: int, auc: float, n_sim: int = 2000, seed: int = 0
) -> float:
    """Mean width of the (unclipped) DeLong 95% CI of one AUC over binormal simulations."""
    n_pos, n_neg = _check_counts(n_pos, n_neg)
    rng = seeded_rng(seed)
    z = stats.norm.ppf(0.975)
    total = 0.0
    for size in _chunks(n_sim):
        y, s, _ = binormal_scores(rng, n_pos, n_neg, auc, auc, 0.0, size)
        total += float(np.sum(2.0 * z * np.sqrt(delong_rows(y, s)[1])))
    return total / n_sim


def paired_power(
    n_pos: int,
    n_neg: int,
    auc_a: float,
    auc_b: float,
    rho: float = 0.6,
    alpha: float = 0.05,
    n_sim: int = 2000,
    seed: int = 0,
) -> float:
    """Power of DeLong's two-sided paired test: fraction of simulated tables with p < alpha.

    Tables come from :func:`binormal_scores` (true AUCs ``auc_a``, ``auc_b``, within-class
    correlation ``rho``). With ``auc_a == auc_b`` this is the test's type-I error rate.
    """
    n_pos, n_neg = _check_counts(n_pos, n_neg)
    rng = seeded_rng(seed)
    hits = 0
    for size in _chunks(n_sim):
        y, a, b = binormal_scores(rng, n_pos, n_neg, auc_a, auc_b, rho, size)
        hits += int(np.count_nonzero(delong_paired_rows(y, a, b)[2] < alpha))
    return hits / n_sim


def estimate_rho(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> float:
    """Pooled within-class Pearson correlation of two models' scores on the same patients.

    Each model's scores are centred on their class mean and the centred scores of all
    patients are correlated (so the separation between classes does not count as
    agreement). Scores ``(seeds, n)`` are averaged over seeds first. Clipped to [0, 0.95];
    0.6 when undefined (fewer than 3 patients, or no within-class spread).
    """
    y = np.asarray(y).astype(int).ravel()
    a, b = (np.asarray(s, dtype=float) for s in (scores_a, scores_b))
    a = a.mean(axis=0) if a.ndim == 2 else a.ravel()
    b = b.mean(axis=0) if b.ndim == 2 else b.ravel()
    if not a.shape == b.shape == y.shape:
        raise ValueError(f"labels {y.shape}, scores_a {a.shape}, scores_b {b.shape} differ")
    if len(y) < 3 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return _RHO_FALLBACK
    ca, cb = a.copy(), b.copy()
    for cls in np.unique(y):
        sel = y == cls
        ca[sel] -= ca[sel].mean()
        cb[sel] -= cb[sel].mean()
    denom = math.sqrt(float(ca @ ca) * float(cb @ cb))
    if not denom > 1e-12:
        return _RHO_FALLBACK
    return float(np.clip(float(ca @ cb) / denom, 0.0, 0.95))


def _split(n: int, prevalence: float) -> tuple[int, int]:
    n_pos = min(max(round(prevalence * n), 2), n - 2)
    return n_pos, n - n_pos


def _check_search(auc_a: float, auc_b: float, prevalence: float) -> None:
    """The inputs of a patient-count search: two different AUCs, a prevalence in (0, 1)."""
    if _check_auc(auc_a, "auc_a") == _check_auc(auc_b, "auc_b"):
        raise ValueError("equal AUCs: no number of patients gives power to detect ΔAUC = 0")
    if not 0.0 < prevalence < 1.0:
        raise ValueError(f"prevalence must lie strictly between 0 and 1, got {prevalence}")


def paired_delta_se(n_pos: int, n_neg: int, auc_a: float, auc_b: float, rho: float) -> float:
    """Normal-approximation SE of a paired ΔAUC (no simulation): √(Va + Vb − 2·rho·√(Va·Vb)),
    Va and Vb the Hanley–McNeil variances of the two AUCs on ``n_pos`` + ``n_neg``
    patients and ``rho`` standing in for the correlation of the two AUC estimates."""
    va = _hanley_mcneil_var(n_pos, n_neg, _check_auc(auc_a, "auc_a"))
    vb = _hanley_mcneil_var(n_pos, n_neg, _check_auc(auc_b, "auc_b"))
    return math.sqrt(max(va + vb - 2.0 * float(rho) * math.sqrt(va * vb), 0.0))


def analytic_patients_for_power(
    auc_a: float,
    auc_b: float,
    rho: float = 0.6,
    prevalence: float = 0.45,
    power: float = 0.8,
    alpha: float = 0.05,
) -> int:
    """Normal-approximation counterpart of :func:`patients_for_power` (no simulation).

    Smallest n with |ΔAUC| / SE(ΔAUC) ≥ z(1−α/2) + z(power), where SE² = Va + Vb −
    2·rho·√(Va·Vb), Va and Vb the Hanley–McNeil variances of the two AUCs and ``rho``
    standing in for the correlation of the two AUC estimates. For AUCs up to 0.95 it lies
    within 25% of the simulated count (tested; measured 0.82–1.23×); above, the Hanley–McNeil
    variance is too large and it overestimates (1.6–2.7× at AUC 0.99–0.999).
    ``patients_for_power`` uses it only there, to skip simulations whose outcome it settles
    by a wide margin.
    """
    _check_search(auc_a, auc_b, prevalence)
    z = stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)
    delta = abs(auc_a - auc_b)

    def reaches(n: int) -> bool:
        return delta >= z * paired_delta_se(*_split(n, prevalence), auc_a, auc_b, rho)

    lo, hi = 4, 8
    while not reaches(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


# ``patients_for_power`` trusts the normal approximation for AUCs up to _ANALYTIC_MAX_AUC
# and, there, simulates only where it is within _ANALYTIC_MARGIN × max_n: beyond that,
# "more than max_n patients" is certain (and simulating it costs tens of seconds).
_ANALYTIC_MAX_AUC = 0.95
_ANALYTIC_MARGIN = 4.0


def patients_for_power(
    auc_a: float,
    auc_b: float,
    rho: float = 0.6,
    prevalence: float = 0.45,
    power: float = 0.8,
    alpha: float = 0.05,
    seed: int = 0,
    n_sim: int = 500,
    max_n: int = 20_000,
) -> int:
    """Smallest total number of test patients whose paired DeLong test reaches ``power``.

    Doubling from 16 patients until the simulated power reaches the target, then bisection
    to within 2% of n (``n_sim`` tables per step, the same ``seed`` throughout, so the
    steps share common random numbers and the power curve is nearly monotone). Positives
    are round(prevalence·n). Raises ``ValueError`` for equal AUCs and ``LymphdxError`` when
    more than ``max_n`` patients would be needed. Monte-Carlo error: about ±10% of n.

    For AUCs up to 0.95 the normal approximation (:func:`analytic_patients_for_power`)
    settles the far cases: above ``4·max_n`` it raises without simulating, and above
    ``max_n`` the doubling goes straight to ``max_n``.
    """
    _check_search(auc_a, auc_b, prevalence)

    def reaches(n: int) -> bool:
        return paired_power(*_split(n, prevalence), auc_a, auc_b, rho, alpha, n_sim, seed) >= power

    too_many = LymphdxError(
        f"more than {max_n} patients needed for {power:.0%} power to detect "
        f"AUC {auc_a:.3f} vs {auc_b:.3f}"
    )
    guess = 0
    if max(auc_a, auc_b) <= _ANALYTIC_MAX_AUC:
        guess = analytic_patients_for_power(auc_a, auc_b, rho, prevalence, power, alpha)
    if guess > _ANALYTIC_MARGIN * max_n:
        raise too_many
    lo, hi = 4, 16
    # doubling; when the approximation says more than max_n, its steps are taken to fail
    while hi < max_n and (guess > max_n or not reaches(hi)):
        lo, hi = hi, 2 * hi
    if hi >= max_n:
        hi = max_n
        if not reaches(max_n):
            raise too_many
    while hi - lo > max(1, int(0.02 * hi)):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def small_test_split_note(
    n_pos: int,
    n_neg: int,
    auc: float = 0.75,
    *,
    too_wide: float = 0.5,
    target_width: float = 0.2,
    min_per_class: int = 5,
) -> str | None:
    """A sentence saying that a test split is too small to mean anything, or None.

    Too small: fewer than ``min_per_class`` patients in a class, or a single AUC's 95%
    interval (Hanley–McNeil, at ``auc``) wider than ``too_wide``. The sentence gives the
    width and how many test patients, at the same prevalence, would narrow it to
    ``target_width``.
    """
    n_pos, n_neg = int(n_pos), int(n_neg)
    if n_pos < 1 or n_neg < 1:
        return (
            f"The test split holds {n_pos} positive and {n_neg} negative patients: an AUC "
            "needs both classes, so it measures nothing."
        )
    auc = min(max(float(auc), 0.55), 0.95)
    width = 2.0 * auc_ci_halfwidth(n_pos, n_neg, auc)
    if min(n_pos, n_neg) >= min_per_class and width <= too_wide:
        return None
    prevalence = n_pos / (n_pos + n_neg)
    n = n_pos + n_neg
    while n < 100_000:
        n = max(n + 1, int(n * 1.05))
        pos = max(1, round(n * prevalence))
        if 2.0 * auc_ci_halfwidth(pos, max(1, n - pos), auc) <= target_width:
            break
    return (
        f"The test split is too small to mean anything: with {n_pos} positive and {n_neg} "
        f"negative patients a single AUC near {auc:.2f} has a 95% interval about "
        f"{width:.2f} wide (Hanley–McNeil); about {n} test patients at this prevalence "
        f"would narrow it to {target_width:.1f}. Use more test patients, or --cv."
    )
