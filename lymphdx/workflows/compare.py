"""``compare``: train and evaluate every strategy × seed, then Table I with intervals.

Statistics over seeds on one fixed test split:
* ``test_auc``: one AUC per seed; ``test_auc_mean`` ± ``test_auc_sd`` over seeds.
* ``test_auc_ci95``: stratified patient bootstrap of the seed-mean AUC (every resample
  scores all seeds on the same resampled patients), so it reflects the few test patients,
  which dominate the uncertainty, not only seed noise.
* ``paired_tests``: each strategy against ``supervised`` and ``ssmdmt`` against each other:
  ΔAUC (seed means), its paired bootstrap CI, and DeLong's paired test on the seed-averaged
  scores (plus the per-seed DeLong p-values); ``p_holm`` and ``supports_claim``: Holm's
  adjustment over the table's paired tests and the claim rule (``stats.multiplicity``;
  ``claim_rule`` says the family and α); ``design``: power, type S and exaggeration at a
  declared gain (``evaluation.declared_effect``, ``stats.design``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import PAPER_STRATEGIES, STRATEGIES, Config, validate
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_csv, write_json, write_text
from lymphdx.core.strategies import STRATEGIES as STRATEGY_FLAGS
from lymphdx.data.manifest import load_manifests
from lymphdx.engine.run_data import split_manifests
from lymphdx.reporting.calibration import calibration_markdown
from lymphdx.reporting.figures import write_roc_png
from lymphdx.reporting.table import format_table
from lymphdx.stats.design import DEFAULT_EFFECT, design_analysis, design_text
from lymphdx.stats.metrics import (
    auc,
    bootstrap_auc_ci,
    delong_paired,
    paired_bootstrap_delta_ci,
)
from lymphdx.stats.multiplicity import ADJUSTMENT, supports_claims
from lymphdx.stats.power import estimate_rho
from lymphdx.workflows.calibrate import cv_calibration, split_calibration
from lymphdx.workflows.compare_runs import expected_cost, finished, reuse_finished, run_one
from lymphdx.workflows.compare_runs import warm_cache as _warm_cache
from lymphdx.workflows.evaluate import read_predictions
from lymphdx.workflows.executors import (
    Executor,
    LocalExecutor,
    PlanExecutor,
    RunsFailed,
    RunTask,
    make_executor,
)
from lymphdx.workflows.folds import (
    add_fold_aucs,
    cv_folds,
    fold_runs,
    out_of_fold,
    pooled_fold_aucs,
    pooled_val_predictions,
)
from lymphdx.workflows.switches import run_switches

__all__ = [
    "compare",
    "summarise",
    "summarise_for",
    "add_claims",
    "finished",
    "run_one",
    "reuse_finished",
    "expected_cost",
]


def _for_strategy(config: Config) -> dict[str, Any]:
    """``config`` as a mapping to re-validate with another strategy: the keys it sets, so
    that keys it leaves to its strategy's defaults (``STRATEGY_DEFAULTS``) get the new
    strategy's."""
    return config.model_dump(mode="json", exclude_unset=True)


def run_all(
    runs: list[tuple[Config, Path, str]],
    weak_csv: Path,
    strong_csv: Path,
    progress: bool,
    jobs: int = 1,
    executor: Executor | None = None,
) -> None:
    """``run_one`` for every ``(config, run folder, description)`` that has not finished,
    by ``executor`` (default: ``LocalExecutor(jobs)``: with ``jobs`` > 1 that many
    processes at once, each with its share of the cores). Runs side by side start the
    longest expected first (``expected_cost``; runs are independent, so the order changes
    no result), on this machine after the preprocessing cache is filled, so they only read
    it (on a cluster the jobs fill it; its writes are atomic). A failed run
    does not stop the others; at the end ``RunsFailed`` names each with its log's end."""
    for config, run_dir, what in runs:
        if finished(run_dir):
            why = reuse_finished(config, run_dir, weak_csv, strong_csv)
            if why and progress:
                print(f"[compare] {what}: scored again ({why})")
    todo = [r for r in runs if not finished(r[1])]
    if not todo and not isinstance(executor, PlanExecutor):
        return
    executor = executor or LocalExecutor(jobs)
    load_manifests(weak_csv, strong_csv)  # a bad manifest fails here, not in every run
    if executor.parallel and len(todo) > 1:
        if executor.warms_cache:
            _warm_cache(todo[0][0], weak_csv, strong_csv)
        # longest first, so that no long run starts last while the other workers idle
        todo.sort(key=lambda r: -expected_cost(r[0]))
    tasks = [RunTask(c, d, what, weak_csv, strong_csv, progress) for c, d, what in todo]
    outcomes = executor.run(tasks, progress)
    failed = sorted((o for o in outcomes if not o.ok), key=lambda o: o.run_dir)
    if failed:
        raise RunsFailed(failed, len(tasks))


def _paired(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n: int,
    ci: float,
    seed: int,
    effect: float = DEFAULT_EFFECT,
    reference_name: str = "B",
) -> dict[str, Any]:
    """``a``, ``b`` ``(S, N)`` scores of two strategies over the same seeds and patients:
    ΔAUC (A − B) with its paired bootstrap CI, DeLong's p, and the design analysis at a
    declared gain ``effect`` over B (``stats.design``). The claim needs the whole family
    (``summarise``)."""
    lo, hi = paired_bootstrap_delta_ci(y, a, b, n, ci, seed)
    pooled = delong_paired(y, a.mean(axis=0), b.mean(axis=0))
    per_seed = [delong_paired(y, sa, sb).p for sa, sb in zip(a, b, strict=True)]
    auc_b = float(np.mean([auc(y, sb) for sb in b]))
    n_pos = int(y.sum())
    design = design_analysis(
        n_pos, len(y) - n_pos, auc_b, effect, estimate_rho(y, a, b), _alpha(ci)
    )
    design["text"] = design_text(design, reference_name)
    return {
        "delta_auc": float(np.mean([auc(y, sa) - auc(y, sb) for sa, sb in zip(a, b, strict=True)])),
        "delta_ci95": [float(lo), float(hi)],
        "p_delong": pooled.p,
        "p_delong_per_seed": per_seed,
        "delta_auc_seed_averaged_scores": pooled.delta,
        "design": design,
    }


def _alpha(ci: float) -> float:
    """The tests' level: that of the intervals (``evaluation.ci`` 0.95: α = 0.05)."""
    return round(1.0 - ci, 12)


def add_claims(results: dict[str, Any], ci: float, effect: float) -> None:
    """Holm's adjustment over the family of all of ``results["paired_tests"]`` and the
    claim rule (``stats.multiplicity``): each test gets ``p_holm`` and ``supports_claim``;
    ``results["claim_rule"]`` records the family, the adjustment, α and the effect."""
    tests = results["paired_tests"]
    alpha = _alpha(ci)
    adjusted, claims = supports_claims(
        [t["p_delong"] for t in tests.values()], [t["delta_ci95"] for t in tests.values()], alpha
    )
    for t, p, claim in zip(tests.values(), adjusted, claims, strict=True):
        t["p_holm"], t["supports_claim"] = p, claim
    results["claim_rule"] = {
        "adjustment": ADJUSTMENT,
        "family_size": len(tests),
        "alpha": alpha,
        "ci": ci,
        "declared_effect": effect,
    }


def summarise(
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    reference: str | None = None,
    effect: float = DEFAULT_EFFECT,
) -> dict[str, Any]:
    """Results from ``strategy -> seed -> patient -> (label, probability)``.

    Paired tests: with ``reference``, every other entry against it; otherwise each
    strategy against ``supervised`` and ``ssmdmt`` against the others. They are one
    family (``add_claims``); ``effect``: the declared ΔAUC of the design analysis."""
    strategies = list(predictions)
    seeds = sorted(next(iter(predictions.values())))
    patients = sorted(next(iter(predictions[strategies[0]].values())))
    y = np.array([predictions[strategies[0]][seeds[0]][p][0] for p in patients])
    scores = {
        s: np.array([[predictions[s][k][p][1] for p in patients] for k in seeds])
        for s in strategies
    }
    out: dict[str, Any] = {
        "seeds": seeds,
        "n_test": len(y),
        "n_test_pos": int(y.sum()),
        "strategies": {},
        "paired_tests": {},
    }
    for s in strategies:
        aucs = [auc(y, row) for row in scores[s]]
        out["strategies"][s] = {
            "test_auc": aucs,
            "test_auc_mean": float(np.mean(aucs)),
            "test_auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
            "test_auc_ci95": list(bootstrap_auc_ci(y, scores[s], n_boot, ci, seed)),
            "paper_auc": STRATEGY_FLAGS[s].paper_auc if s in STRATEGY_FLAGS else None,
        }
    if reference is not None:
        pairs = [(s, reference) for s in strategies if s != reference]
    else:
        pairs = [
            (s, "supervised")
            for s in strategies
            if s != "supervised" and "supervised" in strategies
        ]
        pairs += [
            ("ssmdmt", s)
            for s in strategies
            if s not in ("ssmdmt", "supervised") and "ssmdmt" in strategies
        ]
    for a, b in pairs:
        out["paired_tests"][f"{a} vs {b}"] = _paired(
            y, scores[a], scores[b], n_boot, ci, seed, effect, reference_name=b
        )
    add_claims(out, ci, effect)
    return out


def summarise_for(
    config: Config, predictions: dict, reference: str | None = None
) -> dict[str, Any]:
    """``summarise`` with ``config``'s evaluation settings and seed."""
    e = config.evaluation
    return summarise(predictions, e.bootstrap, e.ci, config.seed, reference, e.declared_effect)


def _compare_cv(
    config: Config,
    weak_csv: Path,
    strong_csv: Path,
    out: Path,
    strategies: list[str],
    seeds: list[int],
    k: int,
    repeats: int,
    progress: bool,
    pooled_selection: bool = False,
    jobs: int = 1,
    executor: Executor | None = None,
) -> tuple[
    dict[str, Any],
    dict[str, dict[str, dict[str, tuple[int, float]]]],
    dict[str, dict[str, dict[str, float]]],
]:
    """Cross-validated comparison; returns the results, the pooled predictions and their
    cross-fitted calibrated probabilities (``calibrate.cv_calibration``).

    ``pooled_selection``: train with ``training.keep_epochs`` and add, per strategy, a
    row ``<strategy>@pooled-val`` scored at the epoch chosen on the pooled validation
    folds (``pooled_val_predictions``)."""
    weak, strong = split_manifests(config, weak_csv, strong_csv, out)
    folds = cv_folds(config, weak, k, repeats)

    def config_of(strategy: str, seed: int) -> Config:
        data = _for_strategy(config)
        data.update(strategy=strategy, seed=seed)
        if pooled_selection:
            data["training"] = {**data.get("training", {}), "keep_epochs": True}
        return validate(data)

    runs = fold_runs(out, folds, weak, strong, strategies, seeds, config_of)
    described = [
        (
            run.config,
            run.run_dir,
            f"cv repeat {run.repeat} fold {run.fold}: {run.name} seed {run.seed}",
        )
        for run in runs
    ]
    run_all(described, weak_csv, strong_csv, progress, jobs, executor)
    oof, fold_aucs = out_of_fold(runs)
    choices = {}
    if pooled_selection:
        for strategy in strategies:
            by_fold = {(r.repeat, r.fold, r.seed): r.run_dir for r in runs if r.name == strategy}
            oof[f"{strategy}@pooled-val"], choices[strategy] = pooled_val_predictions(
                by_fold, folds
            )
            fold_aucs[f"{strategy}@pooled-val"] = pooled_fold_aucs(choices[strategy])
    results = summarise_for(config, oof)
    results.update(mode="cv", cv=k, repeats=repeats, training_seeds=seeds)
    if choices:
        results["pooled_val_choices"] = choices
    run_dirs = {s: [r.run_dir for r in runs if r.name == s] for s in strategies}
    _add_detection(results, run_dirs)
    results["checkpoints"] = scored_checkpoints(out, [r.run_dir for r in runs])
    add_fold_aucs(results, fold_aucs)
    results["calibration"], calibrated = cv_calibration(config, oof, folds, out)
    return results, oof, calibrated


def compare(
    config: Config,
    weak_csv: str | Path,
    strong_csv: str | Path,
    out: str | Path,
    strategies: list[str] | None = None,
    seeds: list[int] | None = None,
    progress: bool = True,
    cv: int = 0,
    repeats: int = 1,
    pooled_selection: bool = False,
    jobs: int = 1,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Train + evaluate every strategy × seed into ``out/runs/<strategy>/seed<k>``
    (default strategies: the paper's four; ``ssmdmt-plus`` on request); writes
    ``out/results.json``, ``out/results.md`` and ``out/roc.png``. Resumable: finished runs
    are kept, interrupted ones resumed.

    With ``cv`` = K > 1: repeated stratified K-fold cross-validation over all labelled
    weak-set patients instead of the fixed split (runs in ``out/cv/repeat<r>/fold<f>/``);
    out-of-fold predictions are pooled, one pooled AUC per repeat × seed. With
    ``pooled_selection`` too, each strategy also gets a row ``<strategy>@pooled-val``:
    the epoch chosen on all folds' validation patients pooled (runs keep every epoch's
    weights). ``executor``: where the runs train (default: ``config.compare``'s, see
    ``workflows.executors``; ``jobs``: the local executor's runs at once, each in its own
    process); a failed run stops no other, and ``RunsFailed`` then names them all, before
    any table is written."""
    out = Path(out)
    executor = executor or make_executor(config.compare, out, jobs)
    strategies = strategies or list(PAPER_STRATEGIES)
    seeds = seeds if seeds is not None else [0]
    for s in strategies:
        if s not in STRATEGIES:
            raise LymphdxError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    if pooled_selection and not cv:
        raise LymphdxError("selection on pooled validation folds needs --cv")
    if cv:
        if cv < 2:
            raise LymphdxError("--cv needs at least 2 folds")
        results, predictions, calibrated = _compare_cv(
            config,
            Path(weak_csv),
            Path(strong_csv),
            out,
            strategies,
            seeds,
            cv,
            repeats,
            progress,
            pooled_selection,
            jobs,
            executor,
        )
        return _write_results(out, config, results, predictions, calibrated)
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]] = {}
    calibrated: dict[str, dict[int, dict[str, float]]] = {}
    runs: list[tuple[Config, Path, str]] = []
    for strategy in strategies:
        for seed in seeds:
            data = _for_strategy(config)
            data.update(strategy=strategy, seed=seed)
            runs.append(
                (validate(data), out / "runs" / strategy / f"seed{seed}", f"{strategy} seed {seed}")
            )
    run_all(runs, Path(weak_csv), Path(strong_csv), progress, jobs, executor)
    for strategy in strategies:
        for seed in seeds:
            run_dir = out / "runs" / strategy / f"seed{seed}"
            predictions.setdefault(strategy, {})[seed] = read_predictions(
                run_dir / "predictions_test.csv"
            )
            rows = read_predictions(run_dir / "predictions_test.csv", calibrated=True)
            calibrated.setdefault(strategy, {})[seed] = {p: v for p, (_, v) in rows.items()}
    results = summarise_for(config, predictions)
    results["mode"] = "split"
    run_dirs = {s: [out / "runs" / s / f"seed{k}" for k in seeds] for s in strategies}
    _add_detection(results, run_dirs)
    results["checkpoints"] = scored_checkpoints(out, [d for ds in run_dirs.values() for d in ds])
    results["calibration"] = split_calibration(run_dirs, out)
    return _write_results(out, config, results, predictions, calibrated)


def scored_checkpoints(out: Path, run_dirs: list[Path]) -> dict[str, Any]:
    """``{run folder under out: the checkpoint its metrics.json was scored from}``, so
    that ``report`` can tell a table whose runs were trained further since."""
    return {
        d.relative_to(out).as_posix(): json.loads((d / "metrics.json").read_text()).get(
            "checkpoint"
        )
        for d in run_dirs
        if (d / "metrics.json").is_file()
    }


def _add_detection(results: dict[str, Any], runs: dict[str, list[Path]]) -> None:
    """Per strategy, each run's Dice and FROC mean sensitivity (``detection.json``) and
    their mean over runs (seeds, or seeds × folds under cross-validation), and which of
    each run's switches fired (``switches.run_switches``)."""
    for strategy, run_dirs in runs.items():
        results["strategies"][strategy]["switches"] = [run_switches(d, strategy) for d in run_dirs]
    for strategy, run_dirs in runs.items():
        rows = [
            json.loads((d / "detection.json").read_text())
            for d in run_dirs
            if (d / "detection.json").exists()
        ]
        if not rows:
            continue
        summary: dict[str, Any] = {}
        for split in ("strong_test", "weak_test"):
            for key, get in (
                ("dice", lambda d: d["dice"]),
                ("froc_mean_sensitivity", lambda d: d["froc"]["mean_sensitivity"]),
            ):
                values = [get(r[split]) for r in rows if split in r and get(r[split]) is not None]
                if values:
                    summary[f"{split}_{key}"] = values
                    summary[f"{split}_{key}_mean"] = float(np.mean(values))
        results["strategies"][strategy]["detection"] = summary
    for strategy, run_dirs in runs.items():  # runs whose ROI decoder found nothing
        not_learned = []
        for d in run_dirs:
            metrics = d / "metrics.json"
            status = json.loads(metrics.read_text()).get("roi_decoder") if metrics.exists() else 0
            if status and not status["learned"]:
                not_learned.append(str(d))
        if not_learned:
            results["strategies"][strategy]["roi_not_learned"] = not_learned
    for strategy, run_dirs in runs.items():  # evaluation.roi_readout: each half alone
        parts = [
            r
            for d in run_dirs
            if (d / "metrics.json").exists()
            and (r := json.loads((d / "metrics.json").read_text()).get("roi_readout"))
            and r.get("applied")
        ]
        if parts:
            results["strategies"][strategy]["roi_readout"] = {
                "runs": len(parts),
                "of_runs": len(run_dirs),
                "auc_classifier_mean": _mean_of(parts, "auc_classifier"),
                "auc_readout_mean": _mean_of(parts, "auc_readout"),
                # absent from metrics written before evaluation.readout: the map, averaged
                "kinds": sorted({r.get("kind", "map") for r in parts}),
                "weights": sorted({float(r.get("weight", 0.5)) for r in parts}),
            }


def _mean_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over ``rows`` where it is a number; ``None`` if nowhere."""
    values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return float(np.mean(values)) if values else None


def _write_results(
    out: Path,
    config: Config,
    results: dict[str, Any],
    predictions: dict,
    calibrated: dict | None = None,
) -> dict:
    """``results.json``, ``results.md`` (Table I, then "Calibration and operating point"),
    ``roc.png`` and ``test_predictions.csv``: ``probability`` the uncalibrated score (the
    one every AUC is computed from), ``probability_calibrated`` beside it (empty where a
    run has none)."""
    results["config_preset"] = config.preset
    write_json(out / "results.json", results)
    table = format_table(results)
    section = calibration_markdown(results.get("calibration"))
    write_text(
        out / "results.md",
        "# Table I on this data\n\n" + table + ("\n" + section if section else ""),
    )
    write_roc_png(out / "roc.png", predictions)
    calibrated = calibrated or {}

    def calibrated_of(s: str, k: Any, pid: str) -> str:
        v = calibrated.get(s, {}).get(k, {}).get(pid)
        return "" if v is None else f"{v:.6f}"

    rows = (
        [s, k, pid, lab, f"{p:.6f}", calibrated_of(s, k, pid)]
        for s, by_seed in predictions.items()
        for k, by_patient in by_seed.items()
        for pid, (lab, p) in sorted(by_patient.items())
    )
    header = ["strategy", "seed", "patient_id", "label", "probability", "probability_calibrated"]
    write_csv(out / "test_predictions.csv", header, rows, "\r\n")
    return results
