"""Design analysis at a declared effect (``stats.design``), checked against Gelman & Carlin's
published example, a Monte Carlo draw of normal estimates, and simulations of DeLong's
paired test under the binormal model (``stats.power``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lymphdx.stats.design import MAX_AUC, design_analysis, design_text, retrodesign
from lymphdx.stats.power import (
    _hanley_mcneil_var,
    analytic_patients_for_power,
    paired_delta_se,
    paired_power,
    patients_for_power,
)


def test_gelman_carlin_published_example() -> None:
    """Gelman & Carlin (2014), "Beyond power calculations", Perspectives on Psychological
    Science 9(6): 641-651, the ovulation-and-voting example: a plausible true effect of 2
    percentage points and a standard error of 8.1 give power 0.06, a Type S error rate of
    24% and an exaggeration ratio of about 9.5-9.7 (their ``retrodesign`` R function
    estimates the ratio from 10,000 simulated estimates; the closed form gives 9.54)."""
    d = retrodesign(2.0, 8.1, 0.05)
    assert round(d.power, 2) == 0.06
    assert round(d.type_s, 2) == 0.24
    assert 9.4 < d.exaggeration < 9.8
    assert d.exaggeration == pytest.approx(9.537, abs=1e-3)


@pytest.mark.parametrize(("effect", "se"), [(2.0, 8.1), (0.05, 0.08), (0.05, 0.02), (1.0, 0.3)])
def test_retrodesign_matches_monte_carlo_normal_estimates(effect: float, se: float) -> None:
    """Draw estimates ~ N(effect, se²), keep those with |estimate| > 1.96·se: their share is
    the power, the wrong-signed share of them type S, their mean |estimate| / effect the
    exaggeration ratio."""
    rng = np.random.default_rng(20140901)
    est = rng.normal(effect, se, 2_000_000)
    sig = np.abs(est) > 1.959963984540054 * se
    d = retrodesign(effect, se)
    assert d.power == pytest.approx(sig.mean(), abs=3e-3)
    assert d.type_s == pytest.approx((est[sig] < 0).mean(), abs=1e-2)
    assert d.exaggeration == pytest.approx(np.abs(est[sig]).mean() / effect, rel=1e-2)


def test_retrodesign_limits_and_bad_input() -> None:
    big = retrodesign(1.0, 0.01)  # a huge study: always significant, right sign, no bias
    assert big.power == pytest.approx(1.0) and big.type_s < 1e-12
    assert big.exaggeration == pytest.approx(1.0, abs=1e-6)
    tiny = retrodesign(1e-6, 1.0)  # no information: power α, half the signs wrong
    assert tiny.power == pytest.approx(0.05, abs=1e-6)
    assert tiny.type_s == pytest.approx(0.5, abs=1e-4)
    assert retrodesign(-2.0, 8.1) == retrodesign(2.0, 8.1)  # the gain's sign is a label
    for effect, se in ((0.0, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            retrodesign(effect, se)


def test_paired_se_by_hand() -> None:
    """ρ = 0: the variances add; ρ = 1: SE = |SD_a − SD_b|."""
    va, vb = _hanley_mcneil_var(30, 40, 0.8), _hanley_mcneil_var(30, 40, 0.85)
    assert paired_delta_se(30, 40, 0.8, 0.85, 0.0) == pytest.approx(math.sqrt(va + vb))
    assert paired_delta_se(30, 40, 0.8, 0.85, 1.0) == pytest.approx(
        abs(math.sqrt(va) - math.sqrt(vb))
    )


@pytest.mark.parametrize(
    ("n_pos", "n_neg", "auc_ref", "rho"),
    [(100, 120, 0.75, 0.6), (60, 80, 0.80, 0.5), (150, 150, 0.70, 0.6), (40, 50, 0.60, 0.3)],
)
def test_design_power_agrees_with_simulated_delong(
    n_pos: int, n_neg: int, auc_ref: float, rho: float
) -> None:
    """The closed form's power against the share of 2,000 simulated binormal tables whose
    DeLong paired test is significant, at the same design (measured gaps ≤ 0.013)."""
    effect = 0.1 if auc_ref < 0.8 else 0.05
    d = design_analysis(n_pos, n_neg, auc_ref, effect, rho)
    simulated = paired_power(n_pos, n_neg, auc_ref, auc_ref + effect, rho, n_sim=2000, seed=3)
    assert d["power"] == pytest.approx(simulated, abs=0.04)


def test_n_for_80_power_is_where_the_design_reaches_80_percent() -> None:
    d = design_analysis(30, 40, 0.80, 0.05, 0.6)
    n80 = d["n_for_80_power"]
    assert n80 == analytic_patients_for_power(0.80, 0.85, 0.6, 30 / 70)

    def power_at(n: int) -> float:
        n_pos = round(n * 30 / 70)
        return design_analysis(n_pos, n - n_pos, 0.80, 0.05, 0.6)["power"]

    assert power_at(n80) >= 0.8 > power_at(n80 - 1)
    # DeLong simulated at that prevalence: within the normal approximation's 25% (power.py)
    simulated = patients_for_power(0.80, 0.85, 0.6, 30 / 70, n_sim=300, seed=1)
    assert 0.75 < n80 / simulated < 1.25


def test_the_papers_table() -> None:
    """The paper's test split (10 positive, 13 negative), supervised 0.81 and its 0.05 gain:
    a table of this size has under 10% power and a significant result would overstate the
    gain several times; a few hundred patients would be needed."""
    d = design_analysis(10, 13, 0.81, 0.05, 0.6)
    assert d["power"] < 0.10 and d["exaggeration"] > 3.0
    assert 300 < d["n_for_80_power"] < 800
    text = design_text(d, "supervised")
    assert "23 test patients" in text and "over supervised (0.81 → 0.86)" in text
    assert f"{d['power']:.0%} of such tables" in text
    assert f"about {d['exaggeration']:.1f}×" in text
    assert f"about {d['n_for_80_power']:,} patients" in text


def test_reference_auc_moved_into_range() -> None:
    """A perfect or near-perfect reference leaves no room for the gain: the pair is moved
    down below MAX_AUC with the gain kept; a reference below chance is taken at chance."""
    top = design_analysis(10, 13, 1.0, 0.05, 0.6)
    assert top["auc_alternative"] == pytest.approx(MAX_AUC)
    assert top["auc_reference_used"] == pytest.approx(MAX_AUC - 0.05)
    assert "its observed AUC 1.00 taken as 0.94" in design_text(top)
    low = design_analysis(10, 13, 0.3, 0.1, 0.6)
    assert low["auc_reference_used"] == 0.5 and low["auc_alternative"] == pytest.approx(0.6)
    for effect in (0.0, 0.49, 0.6):
        with pytest.raises(ValueError, match="declared effect"):
            design_analysis(10, 13, 0.8, effect, 0.6)
