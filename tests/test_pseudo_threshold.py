"""Prevalence-matched pseudo class labels (``propagation.threshold: prevalence``)."""

from __future__ import annotations

import numpy as np
import pytest

from lymphdx.engine.propagation import prevalence_shift


def test_symmetric_scores_at_half_prevalence_are_unchanged() -> None:
    p = np.array([0.2, 0.8], dtype=np.float32)  # logits ±1.386: their median is 0
    np.testing.assert_allclose(prevalence_shift(p, 0.5), p, atol=1e-6)


def test_the_labelled_share_lies_above_one_half_and_order_is_kept() -> None:
    # logits of 0.3 and 0.4 are -0.847 and -0.405; the 0.6 quantile of the five logits
    # lies 40% of the way between them (numpy's linear rule): -0.670
    p = np.array([0.9, 0.1, 0.4, 0.2, 0.3], dtype=np.float32)
    shifted = prevalence_shift(p, 0.4)
    assert list(np.argsort(shifted)) == list(np.argsort(p))
    assert (shifted > 0.5).tolist() == [True, False, True, False, False]
    cut = -0.8473 + 0.4 * (0.8473 - 0.4055)
    expected_top = 1 / (1 + np.exp(-(np.log(0.9 / 0.1) - cut)))
    assert shifted[0] == pytest.approx(expected_top, abs=1e-3)


def test_overconfident_scores_from_another_hospital_are_rebalanced() -> None:
    """A classifier calibrated on hospital A calls all of B's scans positive (p 0.8-0.99):
    with A's prevalence 0.46, 46% of B's scans stay positive, the most probable ones."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.8, 0.99, size=50).astype(np.float32)
    assert (p > 0.5).mean() == 1.0
    shifted = prevalence_shift(p, 0.46)
    called = shifted > 0.5
    assert called.mean() == pytest.approx(0.46, abs=0.021)
    assert p[called].min() > p[~called].max()
