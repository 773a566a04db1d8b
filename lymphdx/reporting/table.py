"""Table I of a comparison: the paper's Table I with intervals, detection scores, paired
tests with the claim rule, and the design analysis. One model (``TableOne``, built by
``table_one`` from the results mapping of ``lymphdx compare``) rendered to Markdown
(``format_table``: ``results.md`` and the command's output) and to HTML
(``table_one_html``: ``lymphdx report``); also the names the tables give the strategies."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from lymphdx.core.strategies import STRATEGIES
from lymphdx.engine.roi_status import ROI_LEARNED_DICE
from lymphdx.reporting.html import escape, fmt, interval, table
from lymphdx.stats.multiplicity import ADJUSTMENT, supports_claims
from lymphdx.stats.power import small_test_split_note

__all__ = [
    "LABELS",
    "label",
    "data_sets",
    "paired_row",
    "claim_rule",
    "design_note",
    "test_split_note",
    "TableOne",
    "table_one",
    "format_table",
    "table_one_html",
]

LABELS = {s.name: s.label for s in STRATEGIES.values()}
DETECTION_KEYS = (
    "strong_test_dice_mean",
    "strong_test_froc_mean_sensitivity_mean",
    "weak_test_dice_mean",
    "weak_test_froc_mean_sensitivity_mean",
)
DETECTION_NOTE = (
    "Dice of the ROI mask (> ζ) and lesion-level FROC mean sensitivity at 1/8–8 false "
    "positives per volume, mean over runs"
)


def label(strategy: str) -> str:
    """The table's name of a strategy (``<s>@pooled-val``: selected on pooled folds)."""
    base, _, selection = strategy.partition("@")
    name = LABELS.get(base, base)
    return f"{name} ({selection} selection)" if selection else name


def data_sets(strategy: str) -> str:
    """Which sets a strategy trains on."""
    base = STRATEGIES.get(strategy.partition("@")[0])
    return "weak" if base is not None and not base.uses_strong else "weak + strong"


def test_split_note(results: dict[str, Any]) -> str | None:
    """``power.small_test_split_note`` for a results mapping (at the strategies' mean AUC)."""
    aucs = [r["test_auc_mean"] for r in results["strategies"].values()]
    n_pos = int(results["n_test_pos"])
    return small_test_split_note(
        n_pos, int(results["n_test"]) - n_pos, float(np.nanmean(aucs)) if aucs else 0.75
    )


@dataclass
class PairedRow:
    """One paired test (``"A vs B"``), its cells formatted ("—" where it has none)."""

    name: str
    delta: str  # ΔAUC (A − B), signed
    ci: str  # its 95% CI (paired bootstrap), signed
    p: str  # DeLong on the seed-averaged scores, raw
    p_holm: str  # Holm-adjusted over the table's paired tests
    p_per_seed: str
    supports_claim: str  # "yes" or "no"
    power: str  # design analysis at the declared effect
    exaggeration: str
    n_for_80_power: str
    design_text: str | None

    @property
    def delta_ci(self) -> str:
        """The cell "ΔAUC [95% CI]"."""
        return f"{self.delta} {self.ci}".strip()


@dataclass
class StrategyRow:
    """One strategy's row of Table I, its cells formatted."""

    label: str
    data_sets: str
    auc: str  # mean ± sd over seeds (pooled AUCs under cross-validation)
    per_run: str  # the per-seed AUCs, or the folds' mean ± sd under cross-validation
    ci: str
    delta: str  # ΔAUC vs supervised [95% CI], "—" without that test
    p: str  # raw
    p_holm: str
    paper: float | None  # the paper's AUC


@dataclass
class TableOne:
    """Table I built once from a results mapping; ``format_table`` and
    ``table_one_html`` lay it out."""

    cv: bool
    caption: str  # what was measured; each layout ends the sentence its own way
    strategies: list[StrategyRow]
    detection: list[tuple[str, list[str]]]  # strategy label, DETECTION_KEYS' cells
    paired: list[PairedRow]
    claim_note: str | None  # the claim rule, the family and the declared effect
    effect: float | None  # the declared effect of the design analysis
    roi_not_learned: list[str]  # warnings: strategies whose ROI decoder found no node
    # per run: (strategy label, run, propagation, decoder, readout): which switches fired
    switches: list[tuple[str, ...]]
    readout_notes: list[str]  # strategies scored with evaluation.roi_readout, each half's AUC
    widths_note: str | None  # how wide the intervals are, and what that means
    split_note: str | None  # ``test_split_note``


def paired_row(name: str, test: dict[str, Any] | None) -> PairedRow:
    """The cells of one entry of ``results["paired_tests"]`` (dashes for ``None``)."""
    if not test:
        return PairedRow(name, "—", "", "—", "—", "", "—", "—", "—", "—", None)
    design = test.get("design") or {}
    exaggeration = design.get("exaggeration")
    return PairedRow(
        name=name,
        delta=f"{test['delta_auc']:+.3f}",
        ci=interval(test.get("delta_ci95"), True),
        p=f"{test['p_delong']:.3f}",
        p_holm=fmt(test.get("p_holm")),
        p_per_seed=", ".join(f"{p:.3f}" for p in test.get("p_delong_per_seed", [])),
        supports_claim={True: "yes", False: "no"}.get(test.get("supports_claim"), "—"),
        power=fmt(design.get("power"), 2),
        exaggeration="—" if exaggeration is None else f"{exaggeration:.1f}×",
        n_for_80_power=fmt(design.get("n_for_80_power")),
        design_text=design.get("text"),
    )


def claim_rule(results: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The paired tests with ``p_holm`` and ``supports_claim``, and the sentence that
    states the rule and the family (``None`` without tests).

    A ``results.json`` written before lymphdx applied Holm has neither key: they are
    recomputed here from its raw p-values and intervals at α = 0.05 (the same rule,
    ``stats.multiplicity``), and the sentence says so; its design analysis is missing."""
    tests = results.get("paired_tests") or {}
    if not tests:
        return {}, None
    rule = results.get("claim_rule")
    recomputed = rule is None or any("p_holm" not in t for t in tests.values())
    if recomputed:
        rule = {"adjustment": ADJUSTMENT, "family_size": len(tests), "alpha": 0.05}
        adjusted, claims = supports_claims(
            [t["p_delong"] for t in tests.values()],
            [t.get("delta_ci95") for t in tests.values()],
            rule["alpha"],
        )
        tests = {
            name: {**t, "p_holm": p, "supports_claim": claim}
            for (name, t), p, claim in zip(tests.items(), adjusted, claims, strict=True)
        }
    alpha, m = rule["alpha"], rule["family_size"]
    text = (
        f"Claims: the table's {m} paired test{'s are one family' if m > 1 else ' is its family'}"
        f"; their DeLong p-values are adjusted by Holm's step-down method, and a comparison "
        f"supports a claim when its Holm-adjusted p < {alpha:g} and its paired "
        f"{1 - alpha:.0%} interval of ΔAUC excludes 0."
    )
    if recomputed:
        text += (
            " (Recomputed from this results.json's raw p-values: it was written before "
            "lymphdx applied Holm's adjustment, and has no design analysis; run compare "
            "again for it.)"
        )
    return tests, text


def design_note(results: dict[str, Any]) -> str | None:
    """The sentence that says what the design-analysis columns are (``None`` when the
    results hold none)."""
    effect = (results.get("claim_rule") or {}).get("declared_effect")
    if effect is None:
        return None
    return (
        f"Design analysis at a gain of {effect:g} in AUC declared before looking "
        "(evaluation.declared_effect, compare --effect), for this test set's size and "
        "prevalence and each pair's score correlation: the paired test's power, how many "
        "times a significant result would overstate that gain on average (exaggeration), "
        "and the patients 80% power needs. It is context for reading a test, not part of "
        "the rule."
    )


def table_one(results: dict[str, Any]) -> TableOne:
    """The model of Table I from ``results.json``'s mapping (``lymphdx compare``)."""
    strategies = results.get("strategies", {})
    tests, claim_note = claim_rule(results)
    cv = results.get("mode") == "cv"
    n_seeds = len(results.get("seeds", []))
    if cv:
        caption = (
            f"Pooled out-of-fold AUC over all {results['n_test']} labelled weak-set patients "
            f"({results['n_test_pos']} positive): stratified {results.get('cv')}-fold "
            f"cross-validation × {results.get('repeats')} repeat(s), training seeds "
            f"{results.get('training_seeds')}; mean ± sd over the {n_seeds} pooled AUCs"
        )
    else:
        caption = (
            f"Classification AUC on the weak set's test split (n = {results.get('n_test')}, "
            f"{results.get('n_test_pos')} positive), {n_seeds} seed(s) {results.get('seeds')}."
        )
    rows = []
    for s, r in strategies.items():
        versus = paired_row("", tests.get(f"{s} vs supervised"))
        per_run = (
            f"folds {r['fold_auc_mean']:.3f} ± {r['fold_auc_sd']:.3f}"
            if cv and "fold_auc_mean" in r
            else ", ".join(f"{a:.3f}" for a in r.get("test_auc", []))
        )
        rows.append(
            StrategyRow(
                label=label(s),
                data_sets=data_sets(s),
                auc=f"{r['test_auc_mean']:.3f} ± {r['test_auc_sd']:.3f}",
                per_run=per_run,
                ci=interval(r.get("test_auc_ci95")),
                delta=versus.delta_ci,
                p=versus.p,
                p_holm=versus.p_holm,
                paper=r.get("paper_auc"),
            )
        )
    detection = [
        (label(s), [fmt(r["detection"].get(k)) for k in DETECTION_KEYS])
        for s, r in strategies.items()
        if r.get("detection")
    ]
    roi_not_learned = []
    for s, r in strategies.items():
        if r.get("roi_not_learned"):
            n_runs = len(r.get("test_auc", [])) if not cv else None
            of = f" of {n_runs}" if n_runs else ""
            roi_not_learned.append(
                f"{label(s)}: the ROI decoder found no node at the end of training "
                f"(strong-validation Dice < {ROI_LEARNED_DICE}: it never learned, or lost "
                f"what it had learned) in {len(r['roi_not_learned'])}{of} run(s), "
                "listed in results.json. Its AUC above is that of a classifier without the "
                "ROI task, not the strategy's."
            )
    readout_notes = []
    for s, r in strategies.items():
        if ro := r.get("roi_readout"):
            cls_auc, ro_auc = fmt(ro.get("auc_classifier_mean")), fmt(ro.get("auc_readout_mean"))
            readout_notes.append(
                f"{label(s)}: the probability {_readout_share(ro)} a logistic regression "
                f"on {_readout_reads(ro)}, fitted on each run's weak training patients "
                f"(evaluation.roi_readout; {ro['runs']} of {ro['of_runs']} runs). Each "
                f"alone, mean test AUC over those runs: classifier {cls_auc}, readout "
                f"{ro_auc}."
            )
    widths = [c[1] - c[0] for r in strategies.values() if (c := r.get("test_auc_ci95"))]
    widths_note = (
        f"The 95% intervals are {min(widths):.2f}–{max(widths):.2f} wide: with "
        f"{results.get('n_test')} test patients, AUC differences smaller than that are not "
        "distinguishable from chance; read ΔAUC by its interval and p, not by its sign."
        if widths
        else None
    )
    has_counts = strategies and results.get("n_test_pos") is not None
    return TableOne(
        cv=cv,
        caption=caption,
        strategies=rows,
        detection=detection,
        paired=[paired_row(name, t) for name, t in tests.items()],
        claim_note=" ".join(n for n in (claim_note, design_note(results)) if n) or None,
        effect=(results.get("claim_rule") or {}).get("declared_effect"),
        roi_not_learned=roi_not_learned,
        switches=[
            (label(s), sw["run"], sw["propagation"], sw["decoder"], sw["readout"])
            for s, r in strategies.items()
            for sw in r.get("switches", [])
            if (sw["propagation"], sw["decoder"], sw["readout"]) != ("—", "—", "—")
        ],
        readout_notes=readout_notes,
        widths_note=widths_note,
        split_note=test_split_note(results) if has_counts else None,
    )


def format_table(results: dict[str, Any]) -> str:
    """Markdown laid out like the paper's Table I, with intervals and paired tests."""
    t = table_one(results)
    tail = " (one per repeat × seed); per-fold AUCs in results.json." if t.cv else ""
    lines = [
        t.caption + tail,
        "",
        "| Training method for the classifier | Data sets | AUC mean ± sd | 95% CI | "
        "ΔAUC vs supervised [95% CI] | p (DeLong, raw) | p (Holm) | paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in t.strategies:
        paper = f"{r.paper:.2f}" if r.paper is not None else ""
        lines.append(
            f"| {r.label} | {r.data_sets} | {r.auc} | {r.ci} | {r.delta} | {r.p} | {r.p_holm} "
            f"| {paper} |"
        )
    if t.detection:
        lines += [
            "",
            f"Detection (the paper's future work): {DETECTION_NOTE}:",
            "",
            "| Strategy | strong test Dice | strong test FROC | weak test Dice | weak test FROC |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in t.detection]
    if t.paired:
        lines += [
            "",
            f"| Paired test (A vs B) | ΔAUC [95% CI] | p (raw) | p (Holm) | supports a claim | "
            f"{_power_header(t.effect)} | exaggeration | n for 80% power |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p.name} | {p.delta_ci} | {p.p} | {p.p_holm} | {p.supports_claim} | {p.power} "
            f"| {p.exaggeration} | {p.n_for_80_power} |"
            for p in t.paired
        ]
        lines += ["", str(t.claim_note)]
    for warning in t.roi_not_learned:
        lines += ["", f"**{warning}**"]
    for note in t.readout_notes:
        lines += ["", note]
    if t.switches:
        lines += [
            "",
            "Switches per run (what a measured figure turned on or off, and on how many "
            "patients it was read):",
            "",
            "| Strategy | run | propagation | ROI decoder at the end | ROI readout |",
            "|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in t.switches]
    if t.widths_note:
        lines += ["", t.widths_note]
    if t.split_note:
        lines += ["", f"**{t.split_note}**"]
    texts = [p for p in t.paired if p.design_text]
    if texts:
        lines += [
            "",
            "Design analysis at the declared gain (binormal model, normal approximation; ρ "
            "estimated from the two strategies' scores):",
            "",
        ]
        lines += [f"- {p.name}: {p.design_text}" for p in texts]
    return "\n".join(lines) + "\n"


def _power_header(effect: float | None) -> str:
    """The design-analysis power column's header."""
    return "power at the declared ΔAUC" if effect is None else f"power at ΔAUC +{effect:g}"


def table_one_html(results: dict[str, Any]) -> str:
    """Table I as HTML: the table (with each run's AUCs), detection, the paired tests in
    full with the claim rule, and the design analysis."""
    t = table_one(results)
    # the caption's fixed words hold no markup; quotes stay as they are
    caption = html.escape(t.caption, quote=False)
    if t.cv:
        caption += "."
    else:
        caption += " 95% CI: stratified patient bootstrap of the seed-mean AUC."
    parts = [f"<p>{caption}</p>"]
    header = [
        "Training method for the classifier",
        "Data sets",
        "AUC mean ± sd",
        "per-fold" if t.cv else "per-seed AUC",
        "95% CI",
        "ΔAUC vs supervised [95% CI]",
        "p (DeLong, raw)",
        "p (Holm)",
        "paper",
    ]
    rows = [
        [r.label, r.data_sets, r.auc, r.per_run, r.ci, r.delta, r.p, r.p_holm, fmt(r.paper, 2)]
        for r in t.strategies
    ]
    parts.append(table(header, rows, "tableone"))
    if t.detection:
        parts.append(
            f"<p>Detection: {html.escape(DETECTION_NOTE, quote=False)} (seeds, or folds × "
            "seeds under cross-validation).</p>"
        )
        header = [
            "Strategy",
            "ROI-set test Dice",
            "ROI-set FROC",
            "label-set Dice",
            "label-set FROC",
        ]
        parts.append(table(header, [[name, *cells] for name, cells in t.detection]))
    if t.paired:
        parts.append("<h3>Paired tests</h3>")
        header = [
            "Comparison (A vs B)",
            "ΔAUC (A − B)",
            "95% CI (paired bootstrap)",
            "p (DeLong, seed-averaged scores, raw)",
            "p (Holm)",
            "p per seed",
            "supports a claim",
            _power_header(t.effect),
            "exaggeration",
            "n for 80% power",
        ]
        rows = [
            [
                *(p.name, p.delta, p.ci, p.p, p.p_holm, p.p_per_seed, p.supports_claim),
                *(p.power, p.exaggeration, p.n_for_80_power),
            ]
            for p in t.paired
        ]
        parts.append(table(header, rows))
        parts.append(f'<p class="note">{escape(t.claim_note)}</p>')
        texts = [p for p in t.paired if p.design_text]
        if texts:
            parts.append("<h3>Design analysis at the declared gain</h3><ul>")
            parts += [f"<li><b>{escape(p.name)}</b>: {escape(p.design_text)}</li>" for p in texts]
            parts.append("</ul>")
    parts += [f'<p class="note">{escape(note)}</p>' for note in t.readout_notes]
    if t.widths_note:
        parts.append(f'<p class="note">{t.widths_note}</p>')
    if t.split_note:
        parts.append(f'<p class="warn">{escape(t.split_note)}</p>')
    return "\n".join(parts)


def _readout_share(ro: dict[str, Any]) -> str:
    """How the readout enters the probability (``evaluation.readout_weight``)."""
    weights = ro.get("weights", [0.5])
    if weights == [0.5]:
        return "is the mean of the classifier's and of"
    if weights == [1.0]:
        return "is, in place of the classifier's, that of"
    shares = " / ".join(f"{w:g}" for w in weights)
    return f"weighs (readout weight {shares}) the classifier's against"


def _readout_reads(ro: dict[str, Any]) -> str:
    """What the readout reads (``evaluation.readout``)."""
    what = {
        "map": "readings of the ROI map and of the image under it",
        "nodes": "each node the ROI map finds (its axes, roundness, margin and texture; "
        "multiple-instance learning, a scan read as its most suspicious node)",
    }
    return " / ".join(what.get(k, k) for k in ro.get("kinds", ["map"]))
