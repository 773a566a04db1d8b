"""Metrics for small test sets: AUC with stratified bootstrap CIs, DeLong's variance and
paired test, and Dice.

DeLong et al. (1988): with placement values V10(x_i) = mean_j ψ(x_i, y_j) over negatives
y_j and V01(y_j) = mean_i ψ(x_i, y_j) over positives x_i, ψ(x, y) = 1[x > y] + ½·1[x = y],
the AUC is mean(V10) and its variance is S10/m + S01/n (S the sample covariances of the
placement values). Two models scored on the same patients give a paired z-test of ΔAUC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import confusion_matrix, log_loss, roc_auc_score

from lymphdx.core.errors import LymphdxError
from lymphdx.core.seeding import seeded_rng

__all__ = [
    "auc",
    "bootstrap_auc_ci",
    "delong",
    "delong_contrast",
    "delong_paired",
    "paired_bootstrap_delta_ci",
    "dice",
    "DeLongResult",
    "binary_log_loss",
    "sensitivity_specificity",
]


def _check(
    y: np.ndarray, scores: np.ndarray, what: str = "scores"
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    s = np.asarray(scores, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and {what} {s.shape} differ in length")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        raise LymphdxError(
            f"AUC is undefined: the {len(y)} patients are all of one class "
            f"({n_pos} positive); the split needs positives and negatives"
        )
    return y, s


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn); ties count one half."""
    y, s = _check(y, scores)
    return float(roc_auc_score(y, s))


def stratified_resamples(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``(n, len(y))`` indices resampling positives and negatives separately."""
    rng = seeded_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([rng.choice(pos, (n, len(pos))), rng.choice(neg, (n, len(neg)))], axis=1)


def _fast_auc_rows(y_rows: np.ndarray, s_rows: np.ndarray) -> np.ndarray:
    """AUC of each row by the rank-sum formula (ties get mid-ranks)."""
    ranks = stats.rankdata(s_rows, axis=1)
    n_pos = y_rows.sum(axis=1)
    n_neg = y_rows.shape[1] - n_pos
    return ((ranks * y_rows).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _score_rows(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,)`` and scores as ``(S, N)``: one row per model run (seed, repeat)."""
    rows = np.atleast_2d(np.asarray(scores, dtype=float))
    y, _ = _check(y, rows[0])
    for row in rows[1:]:
        _check(y, row)
    return y, rows


def _mean_auc(y: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Mean over the rows of the AUC on each resample ``idx`` ``(B, N)``; ``(B,)``."""
    return np.mean([_fast_auc_rows(y[idx], r[idx]) for r in rows], axis=0)


def _interval(values: np.ndarray, ci: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(lo), float(hi)


def bootstrap_auc_ci(
    y: np.ndarray, scores: np.ndarray, n: int = 2000, ci: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of the AUC from a bootstrap stratified by class (keeps both classes).

    ``scores`` ``(N,)``, or ``(S, N)`` for S runs (seeds) on the same patients: then the CI
    of their mean AUC, every resample scoring all runs on the same resampled patients.
    """
    y, rows = _score_rows(y, scores)
    return _interval(_mean_auc(y, rows, stratified_resamples(y, n, seed)), ci)


def paired_bootstrap_delta_ci(
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """CI of AUC(a) − AUC(b) from one stratified bootstrap shared by both models
    (``(N,)`` scores, or ``(S, N)``: the difference of mean AUCs over S runs each)."""
    y, a = _score_rows(y, scores_a)
    _, b = _score_rows(y, scores_b)
    idx = stratified_resamples(y, n, seed)
    return _interval(_mean_auc(y, a, idx) - _mean_auc(y, b, idx), ci)


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Placement values (V10 over positives, V01 over negatives)."""
    x, z = s[y == 1], s[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


@dataclass(frozen=True)
class DeLongResult:
    """Paired DeLong test of AUC(a) − AUC(b) on the same patients."""

    auc_a: float
    auc_b: float
    delta: float
    se: float
    z: float
    p: float
    ci95: tuple[float, float]

    def to_dict(self) -> dict[str, float | list[float]]:
        return {
            "auc_a": self.auc_a,
            "auc_b": self.auc_b,
            "delta_auc": self.delta,
            "se": self.se,
            "z": self.z,
            "p": self.p,
            "delta_ci95_delong": list(self.ci95),
        }


def delong(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC and DeLong's variance of it."""
    y, s = _check(y, scores)
    v10, v01 = _placements(y, s)
    var = np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01)
    return float(v10.mean()), float(var)


def delong_paired(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> DeLongResult:
    """DeLong's paired test of two models scored on the same patients (two-sided p)."""
    y, a = _check(y, scores_a)
    _, b = _check(y, scores_b)
    a10, a01 = _placements(y, a)
    b10, b01 = _placements(y, b)
    s10 = np.cov(np.vstack([a10, b10]), ddof=1)
    s01 = np.cov(np.vstack([a01, b01]), ddof=1)
    cov = s10 / len(a10) + s01 / len(a01)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = float(a10.mean() - b10.mean())
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = 0.0, 1.0 if delta == 0 else 0.0
    else:
        z = delta / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = 1.959963984540054 * se
    return DeLongResult(
        float(a10.mean()), float(b10.mean()), delta, se, float(z), p, (delta - half, delta + half)
    )


def delong_contrast(y: np.ndarray, scores: np.ndarray, contrast: np.ndarray) -> dict[str, float]:
    """DeLong's test of a contrast ``c · AUC`` of K models scored on the same patients
    (DeLong et al. 1988, their eq. for L θ): ``scores`` ``(K, N)``, ``contrast`` ``(K,)``.
    The AUC vector's covariance is S10/m + S01/n of the K models' placement values, so
    ``var(c · AUC) = c' (S10/m + S01/n) c``. ``[1, -1]`` is ``delong_paired``;
    ``[1, -1/K', ..., -1/K']`` tests a model against the mean AUC of K' others.
    Returns ``estimate``, ``se``, ``z``, two-sided ``p`` and the normal ``ci95``."""
    rows = np.atleast_2d(np.asarray(scores, dtype=float))
    c = np.asarray(contrast, dtype=float).ravel()
    if c.shape != (rows.shape[0],):
        raise ValueError(f"contrast {c.shape} does not match {rows.shape[0]} models")
    placed = [_placements(*_check(y, row)) for row in rows]
    v10 = np.vstack([p[0] for p in placed])  # (K, positives)
    v01 = np.vstack([p[1] for p in placed])  # (K, negatives)
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / v10.shape[1]
    cov = cov + np.atleast_2d(np.cov(v01, ddof=1)) / v01.shape[1]
    estimate = float(c @ v10.mean(axis=1))
    se = float(np.sqrt(max(float(c @ cov @ c), 0.0)))
    if se == 0.0:
        z, p = 0.0, 1.0 if estimate == 0 else 0.0
    else:
        z = estimate / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = 1.959963984540054 * se
    return {
        "estimate": estimate,
        "se": se,
        "z": float(z),
        "p": p,
        "ci95": [estimate - half, estimate + half],
    }


def binary_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean binary cross-entropy of probabilities ``p`` ``(N,)`` against labels ``y`` ``(N,)``
    (sklearn's ``log_loss``), ``p`` clipped to [1e-7, 1 − 1e-7] first."""
    clipped = np.clip(np.asarray(p, dtype=np.float64).ravel(), 1e-7, 1 - 1e-7)
    return float(log_loss(np.asarray(y).astype(int).ravel(), clipped, labels=[0, 1]))


def sensitivity_specificity(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """``(TP / positives, TN / negatives)`` of 0/1 predictions ``pred`` ``(N,)`` against
    labels ``y`` ``(N,)`` (sklearn's ``confusion_matrix``); 0.0 for a class that is absent."""
    tn, fp, fn, tp = confusion_matrix(np.asarray(y).astype(int), pred, labels=[0, 1]).ravel()
    return tp / max(1, int(tp + fn)), tn / max(1, int(tn + fp))


# Dice by hand, not monai.metrics.compute_dice: MONAI sums in float32, which would move
# the reported values in the 8th digit; these are exact counts.
def dice_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """``(|P ∩ T|, |P| + |T|)`` of two binary arrays of one shape (nonzero = in the set):
    sums of these over volumes, batches or ranks give the pooled Dice (``dice_of``)."""
    if np.shape(pred) != np.shape(target):
        raise ValueError(f"shapes differ: {np.shape(pred)} vs {np.shape(target)}")
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    return int(np.logical_and(p, t).sum()), int(p.sum() + t.sum())


def dice_of(intersection: float, total: float) -> float:
    """Dice from ``dice_counts`` (summed): 2|P ∩ T| / (|P| + |T|), 1.0 when both are empty."""
    return 1.0 if total == 0 else float(2 * intersection / total)


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap of two binary arrays of one shape; 1.0 when both are empty."""
    return dice_of(*dice_counts(pred, target))
