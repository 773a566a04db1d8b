"""``compare``: train and evaluate every strategy × seed, then Table I with intervals.

Statistics over seeds on one fixed test split:
* ``test_auc``: one AUC per seed; ``test_auc_mean`` ± ``test_auc_sd`` over seeds.
* ``test_auc_ci95``: stratified patient bootstrap of the seed-mean AUC (every resample
  scores all seeds on the same resampled patients), so it reflects the few test patients,
  which dominate the uncertainty, not only seed noise.
* ``paired_tests``: each strategy against ``supervised`` and ``ssmdmt`` against each other:
  ΔAUC (seed means), its paired bootstrap CI, and DeLong's paired test on the seed-averaged
  scores (plus the per-seed DeLong p-values).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import PAPER_STRATEGIES, STRATEGIES, Config, dump_config, validate
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import atomic_path, write_json, write_text
from lymphdx.data.manifest import WeakRecord, load_manifests, write_splits_csv
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.engine.roi_status import ROI_LEARNED_DICE
from lymphdx.engine.selection import VAL_PREDICTIONS, pooled_best_epoch, read_val_predictions
from lymphdx.engine.trainer import (
    cache_dir_of,
    config_differences,
    resolve_manifests,
    split_manifests,
    train,
)
from lymphdx.stats.metrics import (
    auc,
    bootstrap_auc_ci,
    delong_paired,
    paired_bootstrap_delta_ci,
)
from lymphdx.stats.power import estimate_rho, power_statement, small_test_split_note
from lymphdx.workflows.evaluate import (
    evaluate_run,
    load_run_config,
    predict_checkpoint,
    read_predictions,
)

__all__ = ["compare", "summarise", "format_table", "PAPER_AUC"]

PAPER_AUC = {"supervised": 0.81, "semi-supervised": 0.84, "multitask": 0.82, "ssmdmt": 0.86}
LABELS = {
    "supervised": "Supervised Baseline",
    "semi-supervised": "Semi-Supervised",
    "multitask": "Supervised Multi-domain Multi-Task",
    "ssmdmt": "Semi-Supervised Multi-domain Multi-Task",
    "ssmdmt-plus": "SSMDMT + issue 8 options",
}


def label(strategy: str) -> str:
    """The table's name of a strategy (``<s>@pooled-val``: selected on pooled folds)."""
    base, _, selection = strategy.partition("@")
    name = LABELS.get(base, base)
    return f"{name} ({selection} selection)" if selection else name


def data_sets(strategy: str) -> str:
    """Which sets a strategy trains on."""
    return "weak" if strategy.partition("@")[0] == "supervised" else "weak + strong"


def _for_strategy(config: Config) -> dict[str, Any]:
    """``config`` as a mapping to re-validate with another strategy: the keys it sets, so
    that keys it leaves to its strategy's defaults (``STRATEGY_DEFAULTS``) get the new
    strategy's."""
    return config.model_dump(mode="json", exclude_unset=True)


def run_one(
    config: Config,
    run_dir: Path,
    weak_csv: Path,
    strong_csv: Path,
    progress: bool,
    detection: bool = True,
) -> None:
    """Train ``run_dir`` (resuming an interrupted run) and evaluate it on the test split.
    A run that finished earlier (``metrics.json``) is kept (compare is resumable), and
    only scored again when the ``evaluation`` settings changed (``reuse_finished``)."""
    if (run_dir / "metrics.json").exists():
        reuse_finished(config, run_dir, weak_csv, strong_csv, detection)
        return
    resume = (run_dir / "config.yaml").exists()
    train(config, run_dir, weak_csv, strong_csv, resume=resume, progress=progress)
    evaluate_run(run_dir, "test", detection=detection)


def reuse_finished(
    config: Config, run_dir: Path, weak_csv: Path, strong_csv: Path, detection: bool = True
) -> bool:
    """Keep a finished run: refuse it when it was trained with other settings than
    ``config`` (``config_differences``), and score it again (``evaluate_run``) with
    ``config``'s ``evaluation`` section when only that differs, which changes no weight.
    Returns whether it was scored again."""
    saved = load_run_config(run_dir)
    wanted = resolve_manifests(config, weak_csv, strong_csv)
    differ = config_differences(saved, wanted)
    trained = config_differences(saved, wanted, weights_only=True)
    if trained:
        raise LymphdxError(
            f"{run_dir} holds a finished run trained with other settings "
            f"({'; '.join(trained)}); give compare another --out, or remove that run "
            "folder to train it again"
        )
    if not differ:
        return False
    data = saved.model_dump(mode="json")
    data["evaluation"] = wanted.model_dump(mode="json")["evaluation"]
    write_text(run_dir / "config.yaml", dump_config(validate(data)))
    for cached in run_dir.glob("predictions_*@*.csv"):  # predict_checkpoint's, now stale
        cached.unlink()
    evaluate_run(run_dir, "test", detection=detection)
    return True


def _worker_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _warm_cache(config: Config, weak_csv: Path, strong_csv: Path) -> None:
    """Preprocess every scan and mask once, before parallel runs read the cache."""
    weak, strong = load_manifests(weak_csv, strong_csv)
    cache = PreprocessCache(cache_dir_of(config), config.data)
    for w in weak:
        cache.image(w.image, w.patient_id)
    for s in strong:
        cache.image(s.image, s.patient_id)
        cache.mask(s.mask, s.image, s.patient_id)


def run_all(
    runs: list[tuple[Config, Path, str]],
    weak_csv: Path,
    strong_csv: Path,
    progress: bool,
    jobs: int = 1,
) -> None:
    """``run_one`` for every ``(config, run folder, description)``; with ``jobs`` > 1 as
    that many processes at once, each with its share of the cores (runs are independent;
    the preprocessing cache is filled first, so they only read it)."""
    for config, run_dir, what in runs:
        if (run_dir / "metrics.json").exists() and reuse_finished(
            config, run_dir, weak_csv, strong_csv
        ):
            if progress:
                print(f"[compare] {what}: scored again (evaluation settings changed)")
    todo = [r for r in runs if not (r[1] / "metrics.json").exists()]
    if jobs <= 1 or len(todo) <= 1:
        for config, run_dir, what in todo:
            if progress:
                print(f"[compare] {what} -> {run_dir}", flush=True)
            run_one(config, run_dir, weak_csv, strong_csv, progress)
        return
    _warm_cache(todo[0][0], weak_csv, strong_csv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // jobs)
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_threads,
        initargs=(threads,),
    ) as pool:
        futures = {
            pool.submit(run_one, config, run_dir, weak_csv, strong_csv, False): (what, run_dir)
            for config, run_dir, what in todo
        }
        if progress:
            print(f"[compare] {len(todo)} runs, {jobs} at a time, {threads} thread(s) each")
        for future in as_completed(futures):
            future.result()
            if progress:
                what, run_dir = futures[future]
                print(f"[compare] done: {what} -> {run_dir}", flush=True)


def _paired(
    y: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    n: int,
    ci: float,
    seed: int,
    names: tuple[str, str] = ("A", "B"),
) -> dict[str, Any]:
    """``a``, ``b`` ``(S, N)`` scores of two strategies over the same seeds and patients."""
    lo, hi = paired_bootstrap_delta_ci(y, a, b, n, ci, seed)
    pooled = delong_paired(y, a.mean(axis=0), b.mean(axis=0))
    per_seed = [delong_paired(y, sa, sb).p for sa, sb in zip(a, b, strict=True)]
    auc_a = float(np.mean([auc(y, sa) for sa in a]))
    auc_b = float(np.mean([auc(y, sb) for sb in b]))
    power = power_statement(
        int(y.sum()),
        int((1 - y).sum()),
        auc_a,
        auc_b,
        estimate_rho(y, a, b),
        p_value=pooled.p,
        name_a=names[0],
        name_b=names[1],
        seed=seed,
    )
    return {
        "delta_auc": float(np.mean([auc(y, sa) - auc(y, sb) for sa, sb in zip(a, b, strict=True)])),
        "delta_ci95": [float(lo), float(hi)],
        "p_delong": pooled.p,
        "p_delong_per_seed": per_seed,
        "delta_auc_seed_averaged_scores": pooled.delta,
        "power": power["power"],
        "n_for_80_power": power["n_for_80_power"],
        "supports_claim": power["supports_claim"],
        "power_text": power["text"],
    }


def summarise(
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]],
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
    reference: str | None = None,
) -> dict[str, Any]:
    """Results from ``strategy -> seed -> patient -> (label, probability)``.

    Paired tests: with ``reference``, every other entry against it; otherwise each
    strategy against ``supervised`` and ``ssmdmt`` against the others."""
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
            "paper_auc": PAPER_AUC.get(s),
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
            y, scores[a], scores[b], n_boot, ci, seed, names=(a, b)
        )
    return out


def paired_cells(test: dict[str, Any] | None) -> tuple[str, str]:
    """Table cells "ΔAUC [CI]" and "p" of a paired test (dashes when there is none)."""
    if not test:
        return "—", "—"
    lo, hi = test["delta_ci95"]
    return f"{test['delta_auc']:+.3f} [{lo:+.3f}, {hi:+.3f}]", f"{test['p_delong']:.3f}"


def rows_auc(rows: dict[str, tuple[int, float]]) -> float:
    """AUC of ``{patient: (label, probability)}``."""
    return auc(np.array([v[0] for v in rows.values()]), np.array([v[1] for v in rows.values()]))


def test_split_note(results: dict[str, Any]) -> str | None:
    """``power.small_test_split_note`` for a results mapping (at the strategies' mean AUC)."""
    aucs = [r["test_auc_mean"] for r in results["strategies"].values()]
    n_pos = int(results["n_test_pos"])
    return small_test_split_note(
        n_pos, int(results["n_test"]) - n_pos, float(np.nanmean(aucs)) if aucs else 0.75
    )


def format_table(results: dict[str, Any]) -> str:
    """Markdown laid out like the paper's Table I, with intervals and paired tests."""
    seeds = results["seeds"]
    if results.get("mode") == "cv":
        head = (
            f"Pooled out-of-fold AUC over all {results['n_test']} labelled weak-set patients "
            f"({results['n_test_pos']} positive): stratified {results['cv']}-fold "
            f"cross-validation × {results['repeats']} repeat(s), training seeds "
            f"{results['training_seeds']}; mean ± sd over the {len(seeds)} pooled AUCs "
            "(one per repeat × seed); per-fold AUCs in results.json."
        )
    else:
        head = (
            f"Classification AUC on the weak set's test split (n = {results['n_test']}, "
            f"{results['n_test_pos']} positive), {len(seeds)} seed(s) {seeds}."
        )
    lines = [
        head,
        "",
        "| Training method for the classifier | Data sets | AUC mean ± sd | 95% CI | "
        "ΔAUC vs supervised [95% CI] | p (DeLong) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for s, r in results["strategies"].items():
        data = data_sets(s)
        delta, p = paired_cells(results["paired_tests"].get(f"{s} vs supervised"))
        paper = f"{r['paper_auc']:.2f}" if r.get("paper_auc") is not None else ""
        lines.append(
            f"| {label(s)} | {data} | {r['test_auc_mean']:.3f} ± {r['test_auc_sd']:.3f} "
            f"| [{r['test_auc_ci95'][0]:.3f}, {r['test_auc_ci95'][1]:.3f}] | {delta} | {p} "
            f"| {paper} |"
        )
    detected = {s: r["detection"] for s, r in results["strategies"].items() if r.get("detection")}
    if detected:
        lines += [
            "",
            "Detection (the paper's future work): Dice of the ROI mask (> ζ) and lesion-level "
            "FROC mean sensitivity at 1/8–8 false positives per volume, mean over runs:",
            "",
            "| Strategy | strong test Dice | strong test FROC | weak test Dice | weak test FROC |",
            "|---|---|---|---|---|",
        ]
        for s, d in detected.items():
            cells = [
                f"{d[k]:.3f}" if k in d else "—"
                for k in (
                    "strong_test_dice_mean",
                    "strong_test_froc_mean_sensitivity_mean",
                    "weak_test_dice_mean",
                    "weak_test_froc_mean_sensitivity_mean",
                )
            ]
            lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    others = {k: v for k, v in results["paired_tests"].items() if not k.endswith("vs supervised")}
    if others:
        lines += ["", "| Paired test | ΔAUC [95% CI] | p (DeLong) |", "|---|---|---|"]
        for name, t in others.items():
            lines.append(
                f"| {name} | {t['delta_auc']:+.3f} [{t['delta_ci95'][0]:+.3f}, "
                f"{t['delta_ci95'][1]:+.3f}] | {t['p_delong']:.3f} |"
            )
    for s, r in results["strategies"].items():
        if r.get("roi_not_learned"):
            n_runs = len(r.get("test_auc", [])) if results.get("mode") != "cv" else None
            of = f" of {n_runs}" if n_runs else ""
            lines += [
                "",
                f"**{label(s)}: the ROI decoder found no node at the end of training "
                f"(strong-validation Dice < {ROI_LEARNED_DICE}: it never learned, or lost "
                f"what it had learned) in {len(r['roi_not_learned'])}{of} run(s), "
                "listed in results.json. Its AUC above is that of a classifier without the "
                "ROI task, not the strategy's.**",
            ]
    widths = [r["test_auc_ci95"][1] - r["test_auc_ci95"][0] for r in results["strategies"].values()]
    lines += [
        "",
        f"The 95% intervals are {min(widths):.2f}–{max(widths):.2f} wide: with "
        f"{results['n_test']} test patients, AUC differences smaller than that are not "
        "distinguishable from chance; read ΔAUC by its interval and p, not by its sign.",
    ]
    note = test_split_note(results)
    if note:
        lines += ["", f"**{note}**"]
    tests = results["paired_tests"]
    if tests:
        lines += [
            "",
            "Power (binormal simulation, ρ estimated from the two strategies' scores):",
            "",
        ]
        for name, t in tests.items():
            lines.append(f"- {name}: {t['power_text']}")
    return "\n".join(lines) + "\n"


def _roc_plot(path: Path, predictions: dict[str, dict[int, dict[str, tuple[int, float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for s, by_seed in predictions.items():
        patients = sorted(next(iter(by_seed.values())))
        y = np.array([next(iter(by_seed.values()))[p][0] for p in patients])
        score = np.mean([[by_seed[k][p][1] for p in patients] for k in by_seed], axis=0)
        fpr, tpr, _ = roc_curve(y, score)
        ax.plot(fpr, tpr, label=f"{label(s)} (AUC {auc(y, score):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on the test split (scores averaged over seeds)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def cv_assignments(
    weak: list[WeakRecord], k: int, repeats: int, seed: int, val_fraction: float
) -> list[tuple[int, int, dict[str, str]]]:
    """Repeated stratified patient-wise k-fold splits of the weak set.

    Returns ``(repeat, fold, {patient_id: split})``: the fold is ``test``; of the rest a
    stratified ``val_fraction`` (the paper's 10 of 100) is ``val`` for model selection.
    Depends only on the patients, ``k``, ``repeats`` and ``seed``, so every strategy
    sees the same folds.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    records = sorted(weak, key=lambda r: r.patient_id)
    ids = np.array([r.patient_id for r in records])
    y = np.array([r.label for r in records])
    if min(int(y.sum()), int((1 - y).sum())) < k:
        raise LymphdxError(
            f"{k}-fold cross-validation needs at least {k} patients of each class; the weak "
            f"set has {int(y.sum())} positive and {int((1 - y).sum())} negative"
        )
    out = []
    for r in range(repeats):
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed + r)
        for f, (rest, test) in enumerate(folds.split(ids, y)):
            n_val = max(2, round(val_fraction * len(rest)))
            train_idx, val_idx = train_test_split(
                rest, test_size=n_val, stratify=y[rest], random_state=seed * 7919 + r * 101 + f
            )
            assignment = {str(ids[i]): "train" for i in train_idx}
            assignment |= {str(ids[i]): "val" for i in val_idx}
            assignment |= {str(ids[i]): "test" for i in test}
            out.append((r, f, assignment))
    return out


def cv_folds(
    config: Config, weak: list[WeakRecord], k: int, repeats: int
) -> list[tuple[int, int, dict[str, str]]]:
    """``cv_assignments`` of ``weak`` with the config's split seed and validation share
    (val / (train + val) of ``data.split.weak``)."""
    train_w, val_w = config.data.split.weak[0], config.data.split.weak[1]
    return cv_assignments(weak, k, repeats, config.data.split_seed, val_w / (train_w + val_w))


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
) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, tuple[int, float]]]]]:
    """Cross-validated comparison; returns the results and the pooled predictions.

    ``pooled_selection``: train with ``training.keep_epochs`` and add, per strategy, a
    row ``<strategy>@pooled-val`` scored at the epoch chosen on the pooled validation
    folds (``pooled_val_predictions``)."""
    weak, strong = split_manifests(config, weak_csv, strong_csv, out)
    folds = cv_folds(config, weak, k, repeats)
    oof: dict[str, dict[str, dict[str, tuple[int, float]]]] = {}
    fold_aucs: dict[str, list[float]] = {}
    run_dirs: dict[str, list[Path]] = {}
    by_fold: dict[str, dict[tuple[int, int, int], Path]] = {}
    runs: list[tuple[Config, Path, str]] = []
    for r, f, assignment in folds:
        fold_weak = [replace(w, split=assignment[w.patient_id]) for w in weak]
        for strategy in strategies:
            for seed in seeds:
                run_dir = out / "cv" / f"repeat{r}" / f"fold{f}" / strategy / f"seed{seed}"
                if not (run_dir / "splits.csv").exists():
                    write_splits_csv(run_dir / "splits.csv", fold_weak, strong)
                data = _for_strategy(config)
                data.update(strategy=strategy, seed=seed)
                if pooled_selection:
                    data["training"] = {**data.get("training", {}), "keep_epochs": True}
                what = f"cv repeat {r} fold {f}: {strategy} seed {seed}"
                runs.append((validate(data), run_dir, what))
    run_all(runs, weak_csv, strong_csv, progress, jobs)
    for r, f, _ in folds:
        for strategy in strategies:
            for seed in seeds:
                run_dir = out / "cv" / f"repeat{r}" / f"fold{f}" / strategy / f"seed{seed}"
                run_dirs.setdefault(strategy, []).append(run_dir)
                by_fold.setdefault(strategy, {})[(r, f, seed)] = run_dir
                rows = read_predictions(run_dir / "predictions_test.csv")
                oof.setdefault(strategy, {}).setdefault(f"r{r}s{seed}", {}).update(rows)
                fold_aucs.setdefault(strategy, []).append(rows_auc(rows))
    choices = {}
    if pooled_selection:
        for strategy in strategies:
            oof[f"{strategy}@pooled-val"], choices[strategy] = pooled_val_predictions(
                by_fold[strategy], folds
            )
            fold_aucs[f"{strategy}@pooled-val"] = pooled_fold_aucs(choices[strategy])
    results = summarise(oof, config.evaluation.bootstrap, config.evaluation.ci, config.seed)
    results.update(mode="cv", cv=k, repeats=repeats, training_seeds=seeds)
    if choices:
        results["pooled_val_choices"] = choices
    _add_detection(results, run_dirs)
    for strategy, aucs in fold_aucs.items():
        results["strategies"][strategy].update(
            fold_auc=aucs,
            fold_auc_mean=float(np.mean(aucs)),
            fold_auc_sd=float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
        )
    return results, oof


def pooled_val_predictions(
    runs: dict[tuple[int, int, int], Path], folds: list[tuple[int, int, dict[str, str]]]
) -> tuple[dict[str, dict[str, tuple[int, float]]], dict[str, Any]]:
    """Selection on pooled validation folds: ``runs`` maps ``(repeat, fold, seed)`` to a
    run folder trained with ``training.keep_epochs``. For each repeat × seed, the epoch
    of best validation AUC over all its folds' validation patients pooled
    (``selection.pooled_best_epoch``), then each fold's weights of that epoch scored on
    the fold's test patients. Returns the out-of-fold predictions ``{"r<r>s<s>":
    {patient: (label, p)}}`` and the choices ``{"r<r>s<s>": {"epoch", "pooled_val_auc",
    "fold_auc"}}`` (``fold_auc``: each fold's test AUC at that epoch)."""
    keys = sorted({(r, s) for r, _, s in runs})
    oof: dict[str, dict[str, tuple[int, float]]] = {}
    chosen: dict[str, Any] = {}
    for r, s in keys:
        fold_runs = [runs[(r, f, s)] for rr, f, _ in folds if rr == r]
        epoch, scores = pooled_best_epoch(
            [read_val_predictions(d / VAL_PREDICTIONS) for d in fold_runs]
        )
        fold_auc = []
        for d in fold_runs:
            which = f"epoch_{epoch:03d}"
            cached = d / f"predictions_test@{which}.csv"  # predict_checkpoint's cache
            if not (d / "checkpoints" / f"{which}.pt").exists() and not cached.exists():
                raise LymphdxError(
                    f"{d} has no checkpoints/{which}.pt: selection on pooled "
                    "validation folds needs every epoch's weights (training.keep_epochs), and "
                    "this run was trained without them; use a new output folder"
                )
            rows = predict_checkpoint(d, which)
            oof.setdefault(f"r{r}s{s}", {}).update(rows)
            fold_auc.append(rows_auc(rows))
        chosen[f"r{r}s{s}"] = {
            "epoch": epoch,
            "pooled_val_auc": scores[epoch],
            "fold_auc": fold_auc,
        }
    return oof, chosen


def pooled_fold_aucs(choices: dict[str, Any]) -> list[float]:
    """Every fold AUC of ``pooled_val_predictions``'s choices, repeat by repeat."""
    return [a for key in sorted(choices) for a in choices[key]["fold_auc"]]


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
    weights). ``jobs``: runs trained at once, each in its own process (``run_all``)."""
    out = Path(out)
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
        results, predictions = _compare_cv(
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
        )
        return _write_results(out, config, results, predictions)
    predictions: dict[str, dict[int, dict[str, tuple[int, float]]]] = {}
    runs: list[tuple[Config, Path, str]] = []
    for strategy in strategies:
        for seed in seeds:
            data = _for_strategy(config)
            data.update(strategy=strategy, seed=seed)
            runs.append(
                (validate(data), out / "runs" / strategy / f"seed{seed}", f"{strategy} seed {seed}")
            )
    run_all(runs, Path(weak_csv), Path(strong_csv), progress, jobs)
    for strategy in strategies:
        for seed in seeds:
            run_dir = out / "runs" / strategy / f"seed{seed}"
            predictions.setdefault(strategy, {})[seed] = read_predictions(
                run_dir / "predictions_test.csv"
            )
    results = summarise(predictions, config.evaluation.bootstrap, config.evaluation.ci, config.seed)
    results["mode"] = "split"
    _add_detection(results, {s: [out / "runs" / s / f"seed{k}" for k in seeds] for s in strategies})
    return _write_results(out, config, results, predictions)


def _add_detection(results: dict[str, Any], runs: dict[str, list[Path]]) -> None:
    """Per strategy, each run's Dice and FROC mean sensitivity (``detection.json``) and
    their mean over runs (seeds, or seeds × folds under cross-validation)."""
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


def _write_results(out: Path, config: Config, results: dict[str, Any], predictions: dict) -> dict:
    results["config_preset"] = config.preset
    write_json(out / "results.json", results)
    table = format_table(results)
    write_text(out / "results.md", "# Table I on this data\n\n" + table)
    _roc_plot(out / "roc.png", predictions)
    with atomic_path(out / "test_predictions.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["strategy", "seed", "patient_id", "label", "probability"])
        for s, by_seed in predictions.items():
            for k, rows in by_seed.items():
                for pid, (lab, p) in sorted(rows.items()):
                    w.writerow([s, k, pid, lab, f"{p:.6f}"])
    return results
