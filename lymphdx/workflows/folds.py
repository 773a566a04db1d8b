"""Cross-validation folds and the fold loop that ``compare --cv`` and ``compare
--ablation`` share: the repeated stratified folds of the weak set, one run folder per
fold × name × seed (its ``splits.csv`` holding the fold), the out-of-fold predictions
gathered from them, and selection on the pooled validation folds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import Config
from lymphdx.core.errors import LymphdxError
from lymphdx.data.manifest import StrongRecord, WeakRecord
from lymphdx.data.splits import write_splits_csv
from lymphdx.engine.selection import VAL_PREDICTIONS, pooled_best_epoch, read_val_predictions
from lymphdx.stats.metrics import auc
from lymphdx.workflows.evaluate import predict_checkpoint, read_predictions

Fold = tuple[int, int, dict[str, str]]  # (repeat, fold, {patient_id: split})
OutOfFold = dict[str, dict[str, dict[str, tuple[int, float]]]]  # name -> "r<r>s<s>" -> rows


@dataclass(frozen=True)
class FoldRun:
    """One run of a cross-validation: ``name`` (a strategy or an ablation arm) trained on
    fold ``fold`` of repeat ``repeat`` with seed ``seed`` into ``run_dir``."""

    name: str
    repeat: int
    fold: int
    seed: int
    run_dir: Path
    config: Config


def rows_auc(rows: dict[str, tuple[int, float]]) -> float:
    """AUC of ``{patient: (label, probability)}``."""
    return auc(np.array([v[0] for v in rows.values()]), np.array([v[1] for v in rows.values()]))


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
        repeat_runs = [runs[(r, f, s)] for rr, f, _ in folds if rr == r]
        epoch, scores = pooled_best_epoch(
            [read_val_predictions(d / VAL_PREDICTIONS) for d in repeat_runs]
        )
        fold_auc = []
        for d in repeat_runs:
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


def fold_runs(
    out: Path,
    folds: list[Fold],
    weak: list[WeakRecord],
    strong: list[StrongRecord],
    names: list[str],
    seeds: list[int],
    config_of: Callable[[str, int], Config],
    name_major: bool = False,
) -> list[FoldRun]:
    """Every fold × name × seed run of ``out/cv/repeat<r>/fold<f>/<name>/seed<s>``, each
    folder's ``splits.csv`` written (once) with the fold's splits of ``weak`` and the
    strong set's as they are. Fold by fold, or name by name with ``name_major`` (an
    interrupted run then has whole names to show). ``config_of(name, seed)``: its config."""
    order = (
        [(name, fold, seed) for name in names for fold in folds for seed in seeds]
        if name_major
        else [(name, fold, seed) for fold in folds for name in names for seed in seeds]
    )
    runs = []
    for name, (r, f, assignment), seed in order:
        run_dir = out / "cv" / f"repeat{r}" / f"fold{f}" / name / f"seed{seed}"
        if not (run_dir / "splits.csv").exists():
            fold_weak = [replace(w, split=assignment[w.patient_id]) for w in weak]
            write_splits_csv(run_dir / "splits.csv", fold_weak, strong)
        runs.append(FoldRun(name, r, f, seed, run_dir, config_of(name, seed)))
    return runs


def out_of_fold(runs: list[FoldRun]) -> tuple[OutOfFold, dict[str, list[float]]]:
    """The pooled out-of-fold test predictions ``{name: {"r<r>s<s>": {patient: (label,
    p)}}}`` of finished ``runs``, and each name's fold AUCs, in (repeat, fold, seed)
    order."""
    oof: OutOfFold = {}
    fold_aucs: dict[str, list[float]] = {}
    for run in sorted(runs, key=lambda x: (x.repeat, x.fold, x.seed)):
        rows = read_predictions(run.run_dir / "predictions_test.csv")
        oof.setdefault(run.name, {}).setdefault(f"r{run.repeat}s{run.seed}", {}).update(rows)
        fold_aucs.setdefault(run.name, []).append(rows_auc(rows))
    order = list(dict.fromkeys(run.name for run in runs))
    return {n: oof[n] for n in order}, {n: fold_aucs[n] for n in order}


def add_fold_aucs(results: dict[str, Any], fold_aucs: dict[str, list[float]]) -> None:
    """Each row's fold AUCs, their mean and SD, into ``results["strategies"]``."""
    for name, aucs in fold_aucs.items():
        results["strategies"][name].update(
            fold_auc=aucs,
            fold_auc_mean=float(np.mean(aucs)),
            fold_auc_sd=float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
        )
