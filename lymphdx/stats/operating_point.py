"""The operating point: a probability threshold chosen for a purpose on one set of patients
(the calibration patients), then read on others (the test patients).

A patient is called positive when its probability is ≥ the threshold. Targets
(``evaluation.operating_point``):
* ``youden``: the threshold of largest sensitivity + specificity − 1 (the largest such
  threshold when several tie);
* ``{"sensitivity": s}``: the largest threshold whose sensitivity is ≥ s (the most
  specific one that reaches it);
* ``{"specificity": s}``: the smallest threshold whose specificity is ≥ s (the most
  sensitive one that reaches it).
The candidates are the patients' own probabilities (scikit-learn's ``roc_curve`` with
every threshold kept) and 1.0 (nobody positive, unless a probability is exactly 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lymphdx.stats.calibration import number_or_none, wilson_interval

__all__ = ["at_threshold", "choose_threshold", "describe_target"]


def describe_target(target: str | dict[str, float]) -> tuple[str, float | None]:
    """``("youden", None)``, ``("sensitivity", s)`` or ``("specificity", s)``."""
    if isinstance(target, str):
        return target, None
    (what, value), *_ = target.items()
    return str(what), float(value)


def choose_threshold(
    y: np.ndarray, p: np.ndarray, target: str | dict[str, float]
) -> dict[str, Any]:
    """The threshold for ``target`` on labels ``y`` ``(N,)`` and probabilities ``p``
    ``(N,)`` (both classes needed), with the sensitivity and specificity it has there."""
    from sklearn.metrics import roc_curve

    y, p = np.asarray(y, int).ravel(), np.asarray(p, float).ravel()
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # sklearn's first is inf: nobody positive
    what, value = describe_target(target)
    if what == "youden":
        i = int(np.argmax(tpr - fpr))  # thresholds decrease: the first maximum is the largest
    elif what == "sensitivity":
        i = int(np.flatnonzero(tpr >= value - 1e-12)[0])
    else:
        i = int(np.flatnonzero(1 - fpr >= value - 1e-12)[-1])
    return {
        "target": what,
        "value": value,
        "threshold": float(thresholds[i]),
        "sensitivity": float(np.mean(p[y == 1] >= thresholds[i])),
        "specificity": float(np.mean(p[y == 0] < thresholds[i])),
    }


def at_threshold(
    y: np.ndarray, p: np.ndarray, threshold: float, level: float = 0.95
) -> dict[str, Any]:
    """Sensitivity and specificity of ``p ≥ threshold`` on labels ``y`` ``(N,)``, with
    their Wilson intervals and the counts (``None`` where a class is absent)."""
    y, p = np.asarray(y, int).ravel(), np.asarray(p, float).ravel()
    called = p >= threshold
    tp, fn = int((called & (y == 1)).sum()), int((~called & (y == 1)).sum())
    tn, fp = int((~called & (y == 0)).sum()), int((called & (y == 0)).sum())

    def rate(k: int, n: int) -> float | None:
        return k / n if n else None

    return {
        "threshold": float(threshold),
        "sensitivity": rate(tp, tp + fn),
        "sensitivity_ci95": [number_or_none(v) for v in wilson_interval(tp, tp + fn, level)],
        "specificity": rate(tn, tn + fp),
        "specificity_ci95": [number_or_none(v) for v in wilson_interval(tn, tn + fp, level)],
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }
