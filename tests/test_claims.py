"""The claim rule (issue 30): Holm's step-down adjustment over a table's paired tests, a claim
only where the adjusted p < α and the ΔAUC interval excludes 0, and the table that shows raw
and adjusted p beside the design analysis at the declared effect (no observed power)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

from lymphdx.reporting.table import format_table, table_one_html
from lymphdx.stats.design import design_analysis, design_text
from lymphdx.stats.multiplicity import holm, interval_excludes_zero, supports_claims
from lymphdx.workflows.ablation import format_ablation, recommend
from lymphdx.workflows.compare import add_claims


def test_holm_hand_worked() -> None:
    """m = 3, sorted p 0.01, 0.02, 0.04: 3·0.01 = 0.03, 2·0.02 = 0.04, 1·0.04 = 0.04 (each
    at least the one before); in any order; capped at 1."""
    assert holm([0.01, 0.02, 0.04]) == pytest.approx([0.03, 0.04, 0.04])
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # the running maximum: 3·0.01, max(2·0.03, 0.03) = 0.06, max(0.04, 0.06) = 0.06
    assert holm([0.01, 0.03, 0.04]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == pytest.approx([0.2])
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.2])


def test_holm_is_the_step_down_procedure() -> None:
    """Against Holm's procedure itself, at every α: sort the p-values, reject while
    p₍ᵢ₎ ≤ α / (m − i + 1), stop at the first that is not; H is rejected exactly when its
    adjusted p ≤ α."""
    rng = np.random.default_rng(7)
    for m in (1, 2, 5, 7):
        for _ in range(50):
            p = rng.uniform(0, 0.2, m) ** 2
            adjusted = holm(p)
            for alpha in np.linspace(0.001, 0.2, 60):
                rejected = set()
                for i, k in enumerate(np.argsort(p, kind="stable")):
                    if p[k] > alpha / (m - i):
                        break
                    rejected.add(int(k))
                assert rejected == {k for k in range(m) if adjusted[k] <= alpha}


def test_claim_rule_hand_made_family() -> None:
    """Raw p 0.01, 0.02, 0.04 → Holm 0.03, 0.04, 0.04: all below 0.05, so the interval
    decides: one that holds 0 supports no claim whatever its p."""
    adjusted, claims = supports_claims(
        [0.01, 0.02, 0.04], [[0.02, 0.20], [-0.01, 0.15], [-0.30, -0.05]], 0.05
    )
    assert adjusted == pytest.approx([0.03, 0.04, 0.04])
    assert claims == [True, False, True]
    # a raw p below α is not enough once adjusted: 0.03 → 0.06
    adjusted, claims = supports_claims(
        [0.01, 0.03, 0.04], [[0.02, 0.2], [0.01, 0.2], [0.01, 0.2]], 0.05
    )
    assert adjusted == pytest.approx([0.03, 0.06, 0.06]) and claims == [True, False, False]
    assert not interval_excludes_zero([0.0, 0.1]) and not interval_excludes_zero(None)
    with pytest.raises(ValueError, match="intervals"):
        supports_claims([0.01], [], 0.05)


def _strategy(aucs: list[float]) -> dict:
    return {
        "test_auc": aucs,
        "test_auc_mean": float(np.mean(aucs)),
        "test_auc_sd": float(np.std(aucs, ddof=1)),
        "test_auc_ci95": [0.6, 0.95],
        "paper_auc": None,
    }


def _test(delta: float, ci: list[float], p: float, reference: str, auc_ref: float) -> dict:
    design = design_analysis(10, 13, auc_ref, 0.05, 0.6)
    design["text"] = design_text(design, reference)
    return {
        "delta_auc": delta,
        "delta_ci95": ci,
        "p_delong": p,
        "p_delong_per_seed": [p, p],
        "delta_auc_seed_averaged_scores": delta,
        "design": design,
    }


@pytest.fixture
def results() -> dict:
    """A hand-made compare table of three comparisons, raw p 0.01, 0.02, 0.04."""
    out = {
        "seeds": [0, 1],
        "n_test": 23,
        "n_test_pos": 10,
        "strategies": {
            "supervised": _strategy([0.80, 0.82]),
            "multitask": _strategy([0.88, 0.90]),
            "ssmdmt": _strategy([0.90, 0.92]),
        },
        "paired_tests": {
            "multitask vs supervised": _test(0.08, [0.01, 0.15], 0.02, "supervised", 0.81),
            "ssmdmt vs supervised": _test(0.10, [-0.02, 0.22], 0.01, "supervised", 0.81),
            "ssmdmt vs multitask": _test(0.02, [0.005, 0.04], 0.04, "multitask", 0.89),
        },
    }
    add_claims(out, 0.95, 0.05)
    return out


def test_compare_applies_the_rule_to_the_tables_family(results: dict) -> None:
    tests = results["paired_tests"]
    assert [t["p_holm"] for t in tests.values()] == pytest.approx([0.04, 0.03, 0.04])
    assert [t["supports_claim"] for t in tests.values()] == [True, False, True]
    assert results["claim_rule"] == {
        "adjustment": "holm",
        "family_size": 3,
        "alpha": 0.05,
        "ci": 0.95,
        "declared_effect": 0.05,
    }


def test_markdown_table_shows_raw_and_holm_p_and_no_observed_power(results: dict) -> None:
    text = format_table(results)
    header = next(line for line in text.splitlines() if line.startswith("| Paired test"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == [
        "Paired test (A vs B)",
        "ΔAUC [95% CI]",
        "p (raw)",
        "p (Holm)",
        "supports a claim",
        "power at ΔAUC +0.05",
        "exaggeration",
        "n for 80% power",
    ]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in text.splitlines()
        if " vs " in line and line.startswith("|")
    }
    design = results["paired_tests"]["ssmdmt vs supervised"]["design"]
    assert rows["ssmdmt vs supervised"] == [
        "ssmdmt vs supervised",
        "+0.100 [-0.020, +0.220]",
        "0.010",
        "0.030",
        "no",
        f"{design['power']:.2f}",
        f"{design['exaggeration']:.1f}×",
        str(design["n_for_80_power"]),
    ]
    assert rows["multitask vs supervised"][2:5] == ["0.020", "0.040", "yes"]
    assert rows["ssmdmt vs multitask"][2:5] == ["0.040", "0.040", "yes"]
    # Table I's own row: raw and Holm p of the comparison with supervised
    main = next(line for line in text.splitlines() if line.startswith("| Supervised Multi-domain"))
    assert "| 0.020 | 0.040 |" in main
    assert "the table's 3 paired tests are one family" in text
    assert "Holm-adjusted p < 0.05" in text and "gain of 0.05 in AUC declared" in text
    assert design["text"] in text
    assert "observed power" not in text.lower() and "| power |" not in text


def test_html_table_shows_the_same(results: dict) -> None:
    page = table_one_html(results)
    for cell in ("p (Holm)", "supports a claim", "power at ΔAUC +0.05", "exaggeration"):
        assert f"<th>{cell}</th>" in page
    assert "<td>0.030</td>" in page and "Holm&#x27;s step-down" in page
    assert "<th>power</th>" not in page


def test_a_results_json_written_before_holm_still_renders(results: dict) -> None:
    """An old results.json: observed power, its rule and prose, no p_holm, no design: the
    claim is recomputed by the new rule, the old keys are not shown."""
    old = copy.deepcopy(results)
    del old["claim_rule"]
    for t in old["paired_tests"].values():
        for key in ("p_holm", "supports_claim", "design"):
            del t[key]
        t.update(power=0.81, n_for_80_power=20, supports_claim=True, power_text="OLD PROSE")
    text = format_table(old)
    assert "OLD PROSE" not in text and "Recomputed from this results.json" in text
    ssmdmt = next(line for line in text.splitlines() if line.startswith("| ssmdmt vs supervised"))
    assert "| 0.010 | 0.030 | no | — | — | — |" in ssmdmt  # the old rule said yes
    assert "OLD PROSE" not in table_one_html(old)


def test_ablation_arms_are_one_family() -> None:
    """Raw p 0.01 and 0.03 for two adopted arms: Holm 0.02 and 0.03 with two arms; with a
    third, unadopted arm at p 0.5 the family is larger: 0.03, 0.06, 0.5."""
    ref = "ssmdmt"

    def table(arms: dict[str, float]) -> dict:
        tests = {
            f"{arm} vs {ref}": {
                "delta_auc": 0.05 if p < 0.5 else -0.05,
                "delta_auc_seed_averaged_scores": 0.05 if p < 0.5 else -0.05,
                "delta_ci95": [0.01, 0.1] if p < 0.5 else [-0.1, 0.02],
                "p_delong": p,
            }
            for arm, p in arms.items()
        }
        out = {"paired_tests": tests}
        add_claims(out, 0.95, 0.05)
        return out

    two = recommend(table({"graph-lp": 0.01, "curriculum": 0.03}))
    assert two["supports_claim"] == ["graph-lp", "curriculum"]
    three = table({"graph-lp": 0.01, "curriculum": 0.03, "dsbn": 0.5})
    assert [t["p_holm"] for t in three["paired_tests"].values()] == pytest.approx([0.03, 0.06, 0.5])
    assert recommend(three)["supports_claim"] == ["graph-lp"]
    rows = {"ssmdmt": 0.7, "graph-lp": 0.75, "curriculum": 0.74, "dsbn": 0.65}
    three.update(
        cv=3,
        repeats=2,
        training_seeds=[0],
        n_test=100,
        n_test_pos=45,
        n_held_out_test=23,
        arms={a: a for a in rows},
        strategies={a: {**_strategy([v, v + 0.01])} for a, v in rows.items()},
        recommended=recommend(three),
    )
    text = format_ablation(three)
    assert "| +0.050 [+0.010, +0.100] | 0.030 | 0.060 | no |" in text
    assert "the table's 3 paired tests are one family" in text
    assert "supporting a claim: graph-lp" in text


@pytest.mark.parametrize("m", [2, 4])
def test_claims_never_exceed_raw_significance(m: int) -> None:
    """Holm only raises p: a claim implies raw p < α; it keeps the tests' order."""
    for ps in itertools.product([0.001, 0.01, 0.03, 0.2], repeat=m):
        adjusted, claims = supports_claims(list(ps), [[0.01, 0.1]] * m, 0.05)
        assert all(a >= p for a, p in zip(adjusted, ps, strict=True))
        assert all(p < 0.05 for p, c in zip(ps, claims, strict=True) if c)
        order = np.argsort(ps, kind="stable")
        assert np.all(np.diff(np.asarray(adjusted)[order]) >= 0)
