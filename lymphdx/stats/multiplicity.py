"""When a table of paired comparisons supports a claim: Holm's step-down adjustment.

A results table makes several paired tests at once (each strategy against supervised,
ssmdmt against the others; each ablation arm against ssmdmt), so at α = 0.05 each, the
chance that at least one "wins" by luck grows with their number. The family is all the
paired tests of one table, and its p-values are adjusted by Holm's step-down method
(Holm 1979), which keeps the chance of any false claim in the family at most α whatever
the tests' dependence, and is uniformly more powerful than Bonferroni. Holm rather than a
fixed sequence that follows the paper's ordering: the paper's rows have no pre-registered
order that every user shares (a user may compare ``ssmdmt-plus``, pooled-selection rows or
ablation arms), and a fixed sequence loses every test after its first non-rejection.

Adjusted p-values, with p₍₁₎ ≤ … ≤ p₍ₘ₎ the sorted raw p-values of m tests:

    p̃₍ⱼ₎ = min(1, max_{i ≤ j} (m − i + 1) · p₍ᵢ₎),

so that H₍ⱼ₎ is rejected at level α exactly when p̃₍ⱼ₎ ≤ α (the step-down procedure
rejects H₍₁₎, H₍₂₎, … while p₍ᵢ₎ ≤ α / (m − i + 1)).

Claim rule: a comparison supports a claim when its Holm-adjusted p is below α and its
paired interval of ΔAUC excludes 0 (both say the same direction only when the interval
lies on one side of 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ADJUSTMENT", "holm", "interval_excludes_zero", "supports_claims"]

ADJUSTMENT = "holm"  # the name results.json records for the adjustment


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values ``(m,)`` of raw p-values ``(m,)``, in their order.

    Monotone in the raw p-values and capped at 1; an empty family gives an empty array.
    E.g. raw 0.01, 0.04, 0.02 → 0.03, 0.04, 0.04.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]  # (m − i + 1)·p₍ᵢ₎ with i from 1
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def interval_excludes_zero(interval: Sequence[float] | None) -> bool:
    """Whether a ``[lo, hi]`` interval lies strictly on one side of 0 (``None``: no)."""
    if interval is None or len(interval) != 2:
        return False
    lo, hi = (float(v) for v in interval)
    return bool(lo > 0.0 or hi < 0.0)


def supports_claims(
    p_values: Sequence[float],
    intervals: Sequence[Sequence[float] | None],
    alpha: float = 0.05,
) -> tuple[list[float], list[bool]]:
    """The claim rule over one family of paired tests.

    ``p_values`` ``(m,)`` raw two-sided p-values and ``intervals`` ``(m, 2)`` the tests'
    ΔAUC intervals, in the same order. Returns the Holm-adjusted p-values and, per test,
    whether it supports a claim: adjusted p < ``alpha`` and the interval excludes 0.
    """
    if len(p_values) != len(intervals):
        raise ValueError(f"{len(p_values)} p-values but {len(intervals)} intervals")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    adjusted = [float(v) for v in holm(p_values)]
    claims = [
        bool(p < alpha and interval_excludes_zero(ci))
        for p, ci in zip(adjusted, intervals, strict=True)
    ]
    return adjusted, claims
