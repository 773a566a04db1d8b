"""``compare --ablation``: the options beyond the paper, each switched on alone on top of
the paper's ``ssmdmt``, scored by repeated stratified cross-validation on the development data only.

* Development data: the weak set's ``train`` + ``val`` patients of the fixed split
  (``out/splits.csv``, the split every other command uses). Its ``test`` patients are
  left out of ``out/development_weak.csv``, the manifest every ablation run trains and is
  scored on, so nothing here ever loads them: the combination chosen here can then be
  tested on them once (``compare --strategies ssmdmt --strategies ssmdmt-plus``).
* Arms: ``ssmdmt`` (the reference, trained with ``training.keep_epochs``), one trained
  arm per option (``ARMS``), and two selection rules applied to the reference's own runs
  (``POST_HOC``): the last epoch (a fixed-epoch budget) and the epoch of best validation
  AUC pooled over the folds of a repeat.
* Statistics, as ``compare --cv``: out-of-fold predictions pooled over the folds of a
  repeat, one pooled AUC per repeat × seed, a patient bootstrap CI, and per arm ΔAUC vs
  ``ssmdmt`` with its paired bootstrap CI and DeLong's paired test; the arms' tests are
  one family, Holm-adjusted, with compare's claim rule (``stats.multiplicity``).
* ``recommend``: the pre-declared rule that turns the table into a combination of
  options; ``out/recommended.yaml`` is a config of ``ssmdmt`` with them
  (``lymphdx train --config out/recommended.yaml``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lymphdx.core.config import Config, merge, validate
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_csv, write_json, write_text
from lymphdx.data.manifest import WeakRecord
from lymphdx.engine.run_data import split_manifests
from lymphdx.reporting.table import claim_rule, paired_row
from lymphdx.workflows import folds as cv
from lymphdx.workflows.compare import run_one, summarise_for
from lymphdx.workflows.evaluate import predict_checkpoint

__all__ = [
    "ARMS",
    "POST_HOC",
    "REFERENCE",
    "ablation",
    "recommend",
    "recommended_yaml",
    "format_ablation",
]

REFERENCE = "ssmdmt"

# arm -> (what it changes, config overrides on top of ssmdmt)
ARMS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    REFERENCE: ("the paper's method (reference)", {"training": {"keep_epochs": True}}),
    "graph-lp": (
        "pseudo class labels by graph label propagation on embeddings (Iscen et al. 2019)",
        {"propagation": {"method": "graph"}},
    ),
    "ema-teacher": (
        "the EMA mean teacher labels the other set and is the model selected and scored",
        {"propagation": {"teacher": "ema"}, "training": {"selection": "ema"}},
    ),
    "tta-flip": (
        "pseudo-labels averaged over the scan and its left-right flip",
        {"propagation": {"tta_flip": True}},
    ),
    "soft-labels": (
        "soft pseudo class labels (p, not p > 0.5)",
        {"propagation": {"pseudo_labels": "soft"}},
    ),
    "curriculum": (
        "the most confident 20 % of pseudo class labels first, +20 % each round",
        {"propagation": {"curriculum": True}},
    ),
    "roi-ignore": (
        "pseudo ROI masks: voxels with 0.2 ≤ p ≤ ζ count nowhere",
        {"propagation": {"roi_ignore_low": 0.2}},
    ),
    "roi-gate": (
        "pseudo ROI masks only of scans the classifier calls positive (p ≥ 0.5)",
        {"propagation": {"roi_cls_gate": 0.5}},
    ),
    "dsbn": (
        "domain-specific batch-norm statistics (ROI loss on whole scans: no patches)",
        {"model": {"norm": "domain_batch"}, "training": {"roi_patch": None}},
    ),
    "swa": (
        "selection: SWA of the last 5 epochs, batch-norm statistics recomputed",
        {"training": {"selection": "swa"}},
    ),
}
POST_HOC: dict[str, str] = {
    "last": "selection: the final epoch's weights, a fixed-epoch budget (ssmdmt's runs)",
    "pooled-val": (
        "selection: the epoch of best validation AUC pooled over a repeat's folds (ssmdmt's runs)"
    ),
}
# arms that set training.selection: at most one of them can be combined
SELECTION_ARMS = ("ema-teacher", "swa", "last")


def arm_config(config: Config, arm: str, seed: int) -> Config:
    """``config`` as ``ssmdmt`` with ``arm``'s overrides and ``seed``."""
    data = config.model_dump(mode="json", exclude_unset=True)
    data.update(strategy=REFERENCE, seed=seed)
    return validate(merge(data, ARMS[arm][1]), f"ablation arm {arm!r}")


def write_development_manifest(weak: list[WeakRecord], path: Path) -> Path:
    """A weak manifest (``patient_id,image,label``, absolute image paths) of ``weak``."""
    rows = sorted(weak, key=lambda r: r.patient_id)
    rows_out = ([r.patient_id, str(Path(r.image).resolve()), int(r.label)] for r in rows)
    write_csv(path, ["patient_id", "image", "label"], rows_out)
    return path


def ablation(
    config: Config,
    weak_csv: str | Path,
    strong_csv: str | Path,
    out: str | Path,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    k: int = 3,
    repeats: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and score every arm × fold × seed into ``out/cv/repeat<r>/fold<f>/<arm>/
    seed<s>`` (resumable; several processes may share ``out`` with different ``arms``)
    and write ``out/ablation.json``, ``out/ablation.md`` and ``out/recommended.yaml``.
    The reference ``ssmdmt`` is always included (trained after the listed arms unless
    listed)."""
    out = Path(out)
    seeds = seeds if seeds is not None else [0]
    arms = list(arms or [*ARMS, *POST_HOC])
    unknown = [a for a in arms if a not in ARMS and a not in POST_HOC]
    if unknown:
        raise LymphdxError(
            f"unknown ablation arm(s) {', '.join(unknown)}; choose from "
            f"{', '.join([*ARMS, *POST_HOC])}"
        )
    if k < 2:
        raise LymphdxError("the ablation's cross-validation needs at least 2 folds (--cv)")
    if REFERENCE not in arms:  # trained last: another process may be training it now
        arms.append(REFERENCE)
    # out/splits.csv: the fixed split (the strong set's is used by every fold)
    weak, strong = split_manifests(config, weak_csv, strong_csv, out)
    development = [w for w in weak if w.split != "test"]  # the test split is held out
    dev_csv = write_development_manifest(development, out / "development_weak.csv")
    folds = cv.cv_folds(config, development, k, repeats)
    trained = [a for a in arms if a in ARMS]
    runs = cv.fold_runs(
        out,
        folds,
        development,
        strong,
        trained,
        seeds,
        lambda a, s: arm_config(config, a, s),
        name_major=True,  # arm by arm: an interrupted ablation has whole arms to show
    )
    for run in runs:
        if progress and not (run.run_dir / "metrics.json").exists():
            print(
                f"[ablation] {run.name}: repeat {run.repeat} fold {run.fold} seed {run.seed}",
                flush=True,
            )
        run_one(run.config, run.run_dir, dev_csv, Path(strong_csv), progress, detection=False)
    oof, fold_aucs = cv.out_of_fold(runs)
    reference_runs = {(r.repeat, r.fold, r.seed): r.run_dir for r in runs if r.name == REFERENCE}
    choices: dict[str, Any] = {}
    if "last" in arms:
        epochs = arm_config(config, REFERENCE, 0).training.epochs
        for (r, _f, seed), run_dir in sorted(reference_runs.items()):
            rows = predict_checkpoint(run_dir, f"epoch_{epochs - 1:03d}")
            oof.setdefault("last", {}).setdefault(f"r{r}s{seed}", {}).update(rows)
            fold_aucs.setdefault("last", []).append(cv.rows_auc(rows))
    if "pooled-val" in arms:
        oof["pooled-val"], choices = cv.pooled_val_predictions(reference_runs, folds)
        fold_aucs["pooled-val"] = cv.pooled_fold_aucs(choices)
    oof = {REFERENCE: oof[REFERENCE], **oof}  # the reference row first
    results = summarise_for(config, oof, reference=REFERENCE)  # the arms: one family
    results.update(
        mode="ablation",
        cv=k,
        repeats=repeats,
        training_seeds=seeds,
        n_held_out_test=sum(w.split == "test" for w in weak),
        pooled_val_choices=choices,
        arms={a: ARMS[a][0] if a in ARMS else POST_HOC[a] for a in arms},
        overrides={a: ARMS[a][1] for a in arms if a in ARMS},
    )
    cv.add_fold_aucs(results, fold_aucs)
    results["recommended"] = recommend(results)
    write_json(out / "ablation.json", results)
    title = "# Ablation of the options beyond the paper\n\n"
    write_text(out / "ablation.md", title + format_ablation(results))
    base = config.model_dump(mode="json", exclude_unset=True)
    write_text(out / "recommended.yaml", recommended_yaml(results["recommended"], base))
    return results


def recommend(results: dict[str, Any]) -> dict[str, Any]:
    """The pre-declared rule that turns an ablation into ``ssmdmt-plus``'s options.

    An option is adopted when its ΔAUC vs ``ssmdmt`` is positive both in the mean over
    repeats × seeds and in the pooled predictions' DeLong comparison (``delta_auc`` and
    ``delta_auc_seed_averaged_scores`` > 0); of the selection rules (``SELECTION_ARMS``)
    only the one with the largest ΔAUC (``ema-teacher`` then keeps its teacher only if
    it also qualifies). ``pooled-val`` is a cross-validation procedure, not a run option,
    and is reported only. Returns ``{"adopted": [...], "supports_claim": [...],
    "config": {section: {key: value}}}``; ``supports_claim`` lists the adopted options
    whose comparison supports a claim (Holm-adjusted p < α over all arms and a ΔAUC
    interval that excludes 0: ``supports_claim`` of ``compare.add_claims``).
    """
    tests = results["paired_tests"]
    gains = {}
    for name, t in tests.items():
        arm = name.split(" vs ")[0]
        if arm == "pooled-val":
            continue
        if t["delta_auc"] > 0 and t["delta_auc_seed_averaged_scores"] > 0:
            gains[arm] = t["delta_auc"]
    selection = [a for a in gains if a in SELECTION_ARMS]
    best_selection = max(selection, key=lambda a: gains[a]) if selection else None
    adopted = [a for a in gains if a not in SELECTION_ARMS or a == best_selection]
    cfg: dict[str, dict[str, Any]] = {}
    for arm in adopted:
        overrides = {"training": {"selection": "last"}} if arm == "last" else ARMS[arm][1]
        cfg = merge(cfg, overrides)
    if "ema-teacher" in gains and best_selection != "ema-teacher":
        cfg = merge(cfg, {"propagation": {"teacher": "ema"}})
        adopted.append("ema-teacher (teacher only)")
    claimed = [a for a in adopted if a in gains and tests[f"{a} vs {REFERENCE}"]["supports_claim"]]
    return {"adopted": adopted, "supports_claim": claimed, "config": cfg}


def recommended_yaml(recommended: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """A config file (``lymphdx train --config``): ``base`` (the settings the ablation ran
    with) as ``ssmdmt`` with the adopted options, headed by comments that say what was
    adopted and why."""
    adopted = ", ".join(recommended["adopted"]) or "none"
    claimed = ", ".join(recommended["supports_claim"]) or "none"
    head = (
        "# written by lymphdx compare --ablation: ssmdmt with the options its rule adopted\n"
        f"# adopted (ΔAUC vs ssmdmt > 0): {adopted}\n"
        f"# of those, supporting a claim (Holm-adjusted p, CI excludes 0): {claimed}\n"
    )
    body = merge({**(base or {}), "strategy": REFERENCE}, recommended["config"])
    return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def format_ablation(results: dict[str, Any]) -> str:
    """Markdown: one row per arm with its pooled out-of-fold AUC and ΔAUC vs ssmdmt."""
    lines = [
        f"Repeated stratified {results['cv']}-fold cross-validation × {results['repeats']} "
        f"repeat(s), training seed(s) {results['training_seeds']}, on the {results['n_test']} "
        f"development patients ({results['n_test_pos']} positive: the fixed split's train + "
        f"val; its {results['n_held_out_test']} test patients were never loaded). AUC of the "
        "out-of-fold predictions pooled over a repeat's folds, mean ± sd over repeats × "
        "seeds; 95% CI: stratified patient bootstrap; ΔAUC vs ssmdmt with its paired "
        "bootstrap CI and DeLong's paired test on the repeat-averaged scores.",
        "",
        "| arm | what it changes | pooled OOF AUC | 95% CI | per-fold AUC | "
        "ΔAUC vs ssmdmt [95% CI] | p (DeLong, raw) | p (Holm) | supports a claim |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tests, claim_note = claim_rule(results)
    for arm, r in results["strategies"].items():
        t = paired_row(arm, tests.get(f"{arm} vs {REFERENCE}"))
        fold = f"{r['fold_auc_mean']:.3f} ± {r['fold_auc_sd']:.3f}" if "fold_auc" in r else "—"
        lines.append(
            f"| {arm} | {results['arms'].get(arm, '')} | {r['test_auc_mean']:.3f} ± "
            f"{r['test_auc_sd']:.3f} | [{r['test_auc_ci95'][0]:.3f}, "
            f"{r['test_auc_ci95'][1]:.3f}] | {fold} | {t.delta_ci} | {t.p} | {t.p_holm} "
            f"| {t.supports_claim} |"
        )
    if claim_note:
        lines += ["", claim_note]
    if results.get("pooled_val_choices"):
        picks = ", ".join(
            f"{key}: epoch {v['epoch']} (pooled val AUC {v['pooled_val_auc']:.3f})"
            for key, v in results["pooled_val_choices"].items()
        )
        lines += ["", f"pooled-val chose {picks}."]
    rec = results["recommended"]
    lines += [
        "",
        "Recommended for ssmdmt-plus (rule: ΔAUC > 0 in the mean and on the pooled scores; "
        "one selection rule at most): "
        + (", ".join(rec["adopted"]) if rec["adopted"] else "none")
        + "; of those, supporting a claim: "
        + (", ".join(rec["supports_claim"]) if rec["supports_claim"] else "none")
        + ".",
    ]
    return "\n".join(lines) + "\n"
