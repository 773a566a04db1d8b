"""ROC curves at a fixed false-positive-rate grid: the step ROC's sensitivity at each
FPR (``tpr_at_fpr``) and its pointwise band over a class-stratified patient bootstrap
(``roc_band``), as the report draws them."""

from __future__ import annotations

import numpy as np

from lymphdx.stats.metrics import auc, stratified_resamples

__all__ = ["FPR_GRID", "BOOTSTRAP_SEED", "tpr_at_fpr", "roc_band"]

FPR_GRID = np.linspace(0.0, 1.0, 101)
BOOTSTRAP_SEED = 0


def _tpr_at_fpr_rows(pos: np.ndarray, neg: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``(B, G)``: for rows of positive ``(B, P)`` and negative ``(B, Q)`` scores, the
    largest TPR of a threshold whose FPR is ≤ each grid value (the step ROC)."""
    n_neg = neg.shape[1]
    neg_desc = -np.sort(-neg, axis=1)
    allowed = np.floor(np.asarray(grid) * n_neg + 1e-9).astype(int)  # negatives allowed above t
    cut = neg_desc[:, np.minimum(allowed, n_neg - 1)]  # t must lie above this score
    out = np.empty((pos.shape[0], len(grid)))
    step = max(1, 20_000_000 // max(1, len(grid) * pos.shape[1]))
    for start in range(0, pos.shape[0], step):
        sl = slice(start, start + step)
        out[sl] = (pos[sl, None, :] > cut[sl, :, None]).mean(axis=2)
    out[:, allowed >= n_neg] = 1.0
    return out


def tpr_at_fpr(y: np.ndarray, scores: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """Largest sensitivity with 1 − specificity ≤ ``grid`` (ties handled exactly): equals
    ``max(tpr[fpr <= f])`` of ``sklearn.metrics.roc_curve``."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    auc(y, s)  # raises for a one-class set
    return _tpr_at_fpr_rows(s[y == 1][None], s[y == 0][None], grid)[0]


def roc_band(
    y: np.ndarray,
    scores: np.ndarray,
    n: int = 2000,
    ci: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
    grid: np.ndarray = FPR_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the TPR at ``grid`` over a class-stratified patient
    bootstrap (the resampling of :func:`lymphdx.stats.metrics.bootstrap_auc_ci`)."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    auc(y, s)
    idx = stratified_resamples(y, n, seed)  # positives first, then negatives
    n_pos = int(y.sum())
    tpr = _tpr_at_fpr_rows(s[idx[:, :n_pos]], s[idx[:, n_pos:]], grid)
    lo, hi = np.quantile(tpr, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    return lo, hi
