"""Calibration of a scan probability: maps that recalibrate it (fitted on patients the
model did not train on) and the statistics that say how well calibrated it is.

Maps (``fit_recalibration``), each monotone in the probability p:
* ``platt``: p' = σ(a + b·logit p), a logistic regression of the label on logit p with
  Platt's (1999) smoothed targets (positives (N₊+1)/(N₊+2), negatives 1/(N₋+2)), as
  scikit-learn's ``CalibratedClassifierCV(method="sigmoid")`` fits it, so that a
  calibration set the score separates still gives finite a, b. Strictly increasing when
  b > 0; a fit with b ≤ 0 is refused (the identity is kept, with a note).
* ``isotonic``: scikit-learn's ``IsotonicRegression`` (non-decreasing, clipped to the fitted
  range). It ties the scores of a step, so AUCs are computed from the uncalibrated scores.
* ``none``: the identity.

Statistics (``calibration_stats``), with logit p clipped to p ∈ [1e-6, 1 − 1e-6]:
* calibration intercept (calibration-in-the-large): a of logit P(y=1) = a + logit p, i.e.
  logit p as an offset; 0 when the mean prediction matches the event rate.
* calibration slope: b of logit P(y=1) = a + b·logit p; 1 when the spread is right, < 1
  when predictions are too extreme.
* Brier score: mean (p − y)²; ECE: Σ_bins (n_bin / N)·|mean p − fraction positive| over
  ``ECE_BINS`` equal-width bins of [0, 1] (the reliability diagram's bins).
* reliability bins with Wilson intervals of each bin's fraction positive.
* percentile bootstrap intervals (stratified by class, seeded) for all four numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from lymphdx.core.errors import LymphdxError
from lymphdx.core.seeding import seeded_rng
from lymphdx.stats.metrics import stratified_resamples

__all__ = [
    "ECE_BINS",
    "METHODS",
    "MIN_EVENTS",
    "Recalibration",
    "brier",
    "calibration_stats",
    "cross_fitted",
    "ece",
    "fit_recalibration",
    "logistic_fit",
    "logit",
    "number_or_none",
    "reliability_bins",
    "small_set_warning",
    "wilson_interval",
]

METHODS = ("platt", "isotonic", "none")
ECE_BINS = 5
#: fewer events (or non-events) than this in a calibration set: too small to trust
#: (Riley et al. 2020 ask for far more; 20 is where a 2-parameter fit stops being noise)
MIN_EVENTS = 20
_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 − p)) of ``p`` clipped to [1e-6, 1 − 1e-6]; same shape as ``p``."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (scipy's ``binomtest``); NaNs when
    n = 0. 8 of 10: [0.490, 0.943]."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def logistic_fit(
    x: np.ndarray, y: np.ndarray, offset: np.ndarray | None = None, slope: bool = True
) -> np.ndarray:
    """Maximum-likelihood logistic regression logit P(y=1) = offset + a (+ b·x), by
    Newton's method, for each row of ``x``, ``y`` ``(B, N)`` (or ``(N,)``) at once.

    Returns ``(B, 2)`` (a, b) with ``slope``, else ``(B, 1)`` (a); a row whose fit does not
    converge (the classes separated, one class only) is NaN. Written here rather than
    with scikit-learn so that thousands of bootstrap resamples fit in one pass; the tests
    check it against an unpenalised ``LogisticRegression``."""
    x2 = np.atleast_2d(np.asarray(x, dtype=np.float64))
    y2 = np.atleast_2d(np.asarray(y, dtype=np.float64))
    off = np.zeros_like(x2) if offset is None else np.atleast_2d(np.asarray(offset, float))
    design = np.stack([np.ones_like(x2), x2], axis=-1) if slope else np.ones_like(x2)[..., None]
    k = design.shape[-1]
    theta = np.zeros((x2.shape[0], k))
    converged = np.zeros(x2.shape[0], dtype=bool)
    with np.errstate(all="ignore"):
        for _ in range(100):
            mu = _sigmoid(off + np.einsum("bnk,bk->bn", design, theta))
            grad = np.einsum("bnk,bn->bk", design, y2 - mu)
            hess = np.einsum("bnk,bn,bnl->bkl", design, mu * (1 - mu), design)
            hess += 1e-12 * np.eye(k)
            try:
                step = np.linalg.solve(hess, grad[..., None])[..., 0]
            except np.linalg.LinAlgError:
                break
            step = np.clip(np.nan_to_num(step, nan=np.inf), -5.0, 5.0)  # damped: no overshoot
            theta = np.where(converged[:, None], theta, theta + step)
            converged |= np.abs(step).max(axis=1) < 1e-10
            if converged.all():
                break
    # separation: the likelihood keeps rising as |b| grows, so Newton never settles
    theta[~converged | (np.abs(theta) > 1e4).any(axis=1)] = np.nan
    return theta


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities ``p`` ``(N,)`` against labels ``y`` ``(N,)``."""
    return float(np.mean((np.asarray(p, float) - np.asarray(y, float)) ** 2))


def _bin_of(p: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each probability (the last bin holds 1.0)."""
    return np.clip((np.asarray(p, float) * bins).astype(int), 0, bins - 1)


def ece(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of [0, 1]."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    which = _bin_of(p, bins)
    n = np.bincount(which, minlength=bins)
    gap = np.bincount(which, p - y, minlength=bins)  # Σ (p − y) per bin
    return float(np.abs(gap).sum() / max(1, n.sum())) if n.any() else float("nan")


def reliability_bins(
    y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS, level: float = 0.95
) -> list[dict[str, Any]]:
    """Per equal-width bin: its edges, patients, events, mean prediction, fraction
    positive and that fraction's Wilson interval (empty bins: ``n`` 0, ``None`` values,
    as the JSON files hold them)."""
    y, p = np.asarray(y, int), np.asarray(p, float)
    which = _bin_of(p, bins)
    out = []
    for b in range(bins):
        inside = which == b
        n, k = int(inside.sum()), int(y[inside].sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": n,
                "events": k,
                "mean_predicted": float(p[inside].mean()) if n else None,
                "observed": k / n if n else None,
                "observed_ci95": [number_or_none(v) for v in wilson_interval(k, n, level)],
            }
        )
    return out


def small_set_warning(events: int, non_events: int) -> str | None:
    """Why a calibration set of ``events`` positives and ``non_events`` negatives is too
    small to trust (under ``MIN_EVENTS`` of either), else ``None``."""
    if min(events, non_events) >= MIN_EVENTS:
        return None
    return (
        f"too small to trust: {events} events and {non_events} non-events (fewer than "
        f"{MIN_EVENTS} of a class); the map and the threshold fitted on them are rough"
    )


def _interval(values: np.ndarray, ci: float) -> list[float | None]:
    """Percentile interval of the finite ``values``; ``None`` ends when under half are."""
    finite = values[np.isfinite(values)]
    if len(finite) < max(2, len(values) // 2):
        return [None, None]
    lo, hi = np.quantile(finite, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return [float(lo), float(hi)]


def number_or_none(x: float) -> float | None:
    """``x`` as a float, ``None`` when it is NaN or infinite (JSON's null)."""
    return float(x) if np.isfinite(x) else None


def calibration_stats(
    y: np.ndarray,
    p: np.ndarray,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Intercept, slope, Brier and ECE of probabilities ``p`` ``(N,)`` against labels ``y``
    ``(N,)``, each with a percentile bootstrap interval (``n_boot`` resamples, stratified
    by class when both are present, seeded by ``seed``), and the reliability bins. A
    number that is undefined (one class; a slope where the classes are separated) is
    ``None``."""
    y, p = np.asarray(y, int).ravel(), np.asarray(p, float).ravel()
    if len(y) == 0:
        raise LymphdxError("calibration statistics of no patients")
    n_pos = int(y.sum())
    if 0 < n_pos < len(y):
        idx = stratified_resamples(y, n_boot, seed)
    else:
        idx = seeded_rng(seed).integers(0, len(y), (n_boot, len(y)))
    z = logit(p)
    point_int = logistic_fit(z, y, offset=z, slope=False)[0, 0]
    point_ab = logistic_fit(z, y)[0]
    yb, pb, zb = y[idx], p[idx], z[idx]
    boot_int = logistic_fit(zb, yb, offset=zb, slope=False)[:, 0]
    boot_slope = logistic_fit(zb, yb)[:, 1]
    boot_brier = np.mean((pb - yb) ** 2, axis=1)
    boot_ece = np.array([ece(a, b, bins) for a, b in zip(yb, pb, strict=True)])
    return {
        "n": int(len(y)),
        "events": n_pos,
        "intercept": number_or_none(point_int),
        "intercept_ci95": _interval(boot_int, ci),
        "slope": number_or_none(point_ab[1]),
        "slope_ci95": _interval(boot_slope, ci),
        "brier": brier(y, p),
        "brier_ci95": _interval(boot_brier, ci),
        "ece": number_or_none(ece(y, p, bins)),
        "ece_ci95": _interval(boot_ece, ci),
        "ece_bins": f"{bins} equal-width",
        "reliability": reliability_bins(y, p, bins, ci),
    }


@dataclass(frozen=True)
class Recalibration:
    """A fitted monotone map of a probability. ``method``: what is applied (``platt``:
    ``params`` a, b; ``isotonic``: ``params`` the step function's x, y knots; ``none``:
    the identity); ``requested``: what the config asked for; ``note``: why they differ."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    requested: str = "none"
    note: str | None = None

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """The recalibrated probabilities, same shape as ``p``."""
        p = np.asarray(p, dtype=np.float64)
        if self.method == "platt":
            return _sigmoid(self.params["a"] + self.params["b"] * logit(p))
        if self.method == "isotonic":
            return np.interp(p, self.params["x"], self.params["y"])
        return p.copy()

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "requested": self.requested,
            "params": self.params,
            "note": self.note,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recalibration:
        method = data.get("method")
        params = data.get("params") or {}
        need = {"platt": {"a", "b"}, "isotonic": {"x", "y"}, "none": set()}
        if method not in need or not need[method] <= set(params):
            raise LymphdxError(f"not a calibration map: method {method!r}, params {params!r}")
        return cls(str(method), dict(params), str(data.get("requested", method)), data.get("note"))


def _platt(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Platt's a, b: logistic regression on logit p with smoothed targets, each patient a
    weighted positive and negative row (scikit-learn, no penalty)."""
    from sklearn.linear_model import LogisticRegression

    n_pos = int(y.sum())
    target = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (len(y) - n_pos + 2))
    z = logit(p)
    x = np.concatenate([z, z])[:, None]
    labels = np.concatenate([np.ones_like(z), np.zeros_like(z)])
    weights = np.concatenate([target, 1 - target])
    model = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000)
    model.fit(x, labels, sample_weight=weights)
    return float(model.intercept_[0]), float(model.coef_[0, 0])


def fit_recalibration(method: str, y: np.ndarray, p: np.ndarray) -> Recalibration:
    """The ``method`` map (``METHODS``) fitted on labels ``y`` ``(N,)`` and probabilities
    ``p`` ``(N,)``; the identity, with a ``note``, where it cannot be fitted (one class, a
    Platt slope ≤ 0)."""
    if method not in METHODS:
        raise LymphdxError(f"unknown calibration method {method!r}; choose {', '.join(METHODS)}")
    y, p = np.asarray(y, int).ravel(), np.asarray(p, float).ravel()
    if method == "none":
        return Recalibration("none", requested="none")
    n_pos = int(y.sum())
    if not 0 < n_pos < len(y):
        note = (
            f"not fitted: the {len(y)} calibration patients are all of one class "
            f"({n_pos} positive); probabilities left as they are"
        )
        return Recalibration("none", requested=method, note=note)
    if method == "platt":
        a, b = _platt(y, p)
        if not b > 0:
            note = (
                f"not applied: Platt's fitted slope {b:.3g} is not positive (the score ranks "
                "the calibration patients the wrong way), which would reverse the ranking; "
                "probabilities left as they are"
            )
            return Recalibration("none", requested="platt", note=note)
        return Recalibration("platt", {"a": a, "b": b}, requested="platt")
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    knots = {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    return Recalibration("isotonic", knots, requested="isotonic")


def cross_fitted(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, method: str
) -> tuple[np.ndarray, list[Recalibration]]:
    """Cross-fitted recalibration: each patient's probability through the map fitted on
    the patients of the other ``groups`` (e.g. cross-validation folds), so no patient is
    calibrated by a map fitted on it. ``y``, ``p``, ``groups`` ``(N,)``; returns the
    calibrated ``(N,)`` and the maps in the order of ``np.unique(groups)``."""
    y, p, groups = np.asarray(y, int), np.asarray(p, float), np.asarray(groups)
    out = np.empty_like(p)
    maps = []
    for g in np.unique(groups):
        inside = groups == g
        fitted = fit_recalibration(method, y[~inside], p[~inside])
        out[inside] = fitted(p[inside])
        maps.append(fitted)
    return out, maps
