"""Design analysis of a paired AUC comparison at a declared effect (Gelman & Carlin 2014).

Power computed at the *observed* ΔAUC ("observed power") is a one-to-one function of the
observed p-value and adds nothing to it (Hoenig & Heisey 2001). Gelman & Carlin instead
ask, for an effect size declared from outside the data (here a ΔAUC, by default 0.05, the
paper's ssmdmt − supervised gain): with a test set of this size and prevalence and the
two models' observed score correlation,

* power: how often the paired test would reach p < α;
* type S: the chance that a significant estimate has the wrong sign;
* exaggeration (type M): E(|estimate| | significant) / effect, how far a significant
  result overstates the true effect on average;
* how many patients at this prevalence would give 80% power.

It is context for reading a test, not a gate: the claim rule is ``stats.multiplicity``.

The estimate of ΔAUC is taken as normal, D̂ ~ N(D, s²), s from the binormal model's
Hanley–McNeil variances at (AUC_ref, AUC_ref + D) and the observed correlation ρ
(``power.paired_delta_se``). With z = Φ⁻¹(1 − α/2) and λ = D/s, Gelman & Carlin's
retrodesign in closed form (Lu, Qiu & Deng 2019 give the same expressions):

    power = Φ(−z − λ) + 1 − Φ(z − λ),     type S = Φ(−z − λ) / power,
    E(|D̂|; |D̂| > zs) = D·[1 − Φ(z − λ) − Φ(−z − λ)] + s·[φ(z − λ) + φ(z + λ)],
    exaggeration = E(|D̂|; |D̂| > zs) / (power · D).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats

from lymphdx.stats.power import analytic_patients_for_power, paired_delta_se

__all__ = [
    "DEFAULT_EFFECT",
    "MAX_AUC",
    "Retrodesign",
    "retrodesign",
    "design_analysis",
    "design_text",
]

DEFAULT_EFFECT = 0.05  # the paper's ssmdmt − supervised gain (0.86 − 0.81)
# the larger of the two AUCs that the analysis posits: a true AUC of 1 has no binormal
# model and a Hanley–McNeil variance of 0, which would make any gain look certain
MAX_AUC = 0.99


@dataclass(frozen=True)
class Retrodesign:
    """Gelman & Carlin's design quantities of a normal estimate at a true effect."""

    power: float
    type_s: float
    exaggeration: float


def retrodesign(effect: float, se: float, alpha: float = 0.05) -> Retrodesign:
    """Power, type S and exaggeration of a two-sided z-test at level ``alpha`` when the
    estimate is N(``effect``, ``se``²) (closed form; see the module docstring).

    Gelman & Carlin's example (true effect 2, SE 8.1): power 0.06, type S 0.24,
    exaggeration 9.5.
    """
    effect, se = abs(float(effect)), float(se)
    if not effect > 0.0:
        raise ValueError(f"the effect must be nonzero, got {effect}")
    if not se > 0.0:
        raise ValueError(f"the standard error must be positive, got {se}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    z = stats.norm.ppf(1.0 - alpha / 2.0)
    lam = effect / se
    low = stats.norm.cdf(-z - lam)  # significant, wrong sign
    high = stats.norm.sf(z - lam)  # significant, right sign
    power = low + high
    mean_abs = effect * (high - low) + se * (stats.norm.pdf(z - lam) + stats.norm.pdf(z + lam))
    return Retrodesign(
        power=float(power), type_s=float(low / power), exaggeration=float(mean_abs / power / effect)
    )


def design_analysis(
    n_pos: int,
    n_neg: int,
    auc_reference: float,
    effect: float = DEFAULT_EFFECT,
    rho: float = 0.6,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Design analysis of a paired ΔAUC test on ``n_pos`` + ``n_neg`` patients at a
    declared gain ``effect`` over a reference model of AUC ``auc_reference``.

    The two posited AUCs are (r, r + ``effect``) with r = ``auc_reference`` moved into
    [0.5, ``MAX_AUC`` − ``effect``]: a reference below chance is taken at chance, and one
    too close to 1 for the gain is moved down so that the gain itself stays as declared
    (``auc_reference_used`` records it; near 1, Hanley–McNeil's variance is too large,
    so the power there errs low). ``rho``: the within-class correlation of the two
    models' scores (``power.estimate_rho``), standing in for that of their AUCs.

    Returns ``effect``, ``auc_reference`` (as given), ``auc_reference_used``,
    ``auc_alternative``, ``rho``, ``alpha``, ``se``, ``power``, ``type_s``,
    ``exaggeration``, ``n`` (patients now) and ``n_for_80_power`` (patients at the same
    prevalence for 80% power, normal approximation: ``analytic_patients_for_power``).
    """
    n_pos, n_neg = int(n_pos), int(n_neg)
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"need positives and negatives, got {n_pos} and {n_neg}")
    effect = float(effect)
    if not 0.0 < effect < MAX_AUC - 0.5:
        raise ValueError(f"the declared effect must lie in (0, {MAX_AUC - 0.5:g}), got {effect}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    reference = min(max(float(auc_reference), 0.5), MAX_AUC - effect)
    alternative = reference + effect
    se = paired_delta_se(n_pos, n_neg, reference, alternative, rho)
    design = retrodesign(effect, se, alpha)
    n80 = analytic_patients_for_power(
        reference, alternative, rho, n_pos / (n_pos + n_neg), 0.8, alpha
    )
    return {
        "effect": effect,
        "auc_reference": float(auc_reference),
        "auc_reference_used": reference,
        "auc_alternative": alternative,
        "rho": float(rho),
        "alpha": float(alpha),
        "se": se,
        **asdict(design),
        "n": n_pos + n_neg,
        "n_for_80_power": n80,
    }


def design_text(design: dict[str, Any], reference_name: str = "the reference") -> str:
    """One sentence of a ``design_analysis`` result, e.g. "With 23 test patients and
    ρ = 0.60, a true gain of 0.05 in AUC over supervised (0.81 → 0.86) reaches p < 0.05
    in 9% of such tables; a significant result overstates it about 2.8× on average ..."."""
    ref, used = design["auc_reference"], design["auc_reference_used"]
    moved = (
        f", its observed AUC {ref:.2f} taken as {used:.2f}"
        if not math.isclose(ref, used, abs_tol=5e-3)
        else ""
    )
    n, n80 = design["n"], design["n_for_80_power"]
    need = (
        f"about {n80:,} patients at this prevalence would give 80% power"
        if n80 > n
        else "this many patients already give 80% power"
    )
    return (
        f"With {n} test patients and ρ = {design['rho']:.2f}, a true gain of "
        f"{design['effect']:.2f} in AUC over {reference_name} ({used:.2f} → "
        f"{design['auc_alternative']:.2f}{moved}) reaches p < {design['alpha']:g} in "
        f"{design['power']:.0%} of such tables; a significant result overstates it about "
        f"{design['exaggeration']:.1f}× on average and has the wrong sign "
        f"{design['type_s']:.1%} of the time; {need}."
    )
