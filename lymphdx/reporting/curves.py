"""Learning curves: when has a run learned?

Every run folder holds ``history.csv`` (one row per epoch). This module reads the
weak-validation AUC and the strong-validation Dice of each run against the training
steps done (``step``: cumulative optimiser steps at the end of the epoch; ``epoch + 1``
where a run logged none) and draws them side by side, one colour per strategy, one thin
line per run (seed, fold) and a thick line for the mean over the runs at the steps they
all share. A dashed vertical line marks where the ROI warm-up ended, a dotted one (with a
triangle at the top) the first propagation of pseudo labels.

``find_runs`` lists the runs of a compare folder (``runs/<strategy>/seed<k>/`` or
``cv/repeat<r>/fold<f>/<strategy>/seed<k>/``) or of a single run folder.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import atomic_path, path_problem
from lymphdx.reporting.figures import pyplot, strategy_colors
from lymphdx.reporting.runs import float_or_nan, natural_key, strategy_order

__all__ = [
    "read_curves",
    "read_history_curve",
    "plot_learning_curves",
    "learning_curves_figure",
    "find_runs",
    "has_dice",
    "mean_curve",
    "summarize",
    "markdown_table",
]

HISTORY = "history.csv"
WARMUP_PHASE = "roi-warmup"
_RUN_PART = re.compile(r"(repeat|fold|seed)\d+")


# --------------------------------------------------------------------------- finding runs


def _config_strategy(run: Path) -> str:
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LymphdxError(f"cannot read {run / 'config.yaml'}: {err}") from None
    if not isinstance(config, dict) or not config.get("strategy"):
        raise LymphdxError(f"{run / 'config.yaml'} names no strategy")
    return str(config["strategy"])


def find_runs(folder: Path) -> dict[str, list[Path]]:
    """The runs of ``folder``: strategy -> run folders (natural order of their paths).

    ``folder`` is a run folder (it has ``config.yaml``; its strategy is read from it) or a
    compare folder whose runs lie at ``runs/<strategy>/seed<k>/`` (split mode) or
    ``cv/repeat<r>/fold<f>/<strategy>/seed<k>/`` (cross-validation); only runs that
    already wrote ``history.csv`` are listed. Raises ``LymphdxError`` if there is none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = path_problem(folder)  # missing, a dangling link, a loop of links
        raise LymphdxError(f"{folder} is not a folder" + (f": it {problem}" if problem else ""))
    if (folder / "config.yaml").is_file():
        return {_config_strategy(folder): [folder]}
    found: dict[str, list[Path]] = {}
    patterns = ("runs/*/seed*/" + HISTORY, "cv/repeat*/fold*/*/seed*/" + HISTORY)
    for pattern in patterns:
        for hist in folder.glob(pattern):
            run = hist.parent
            if hist.is_file() and not any(p.startswith(".") for p in run.parts[-4:]):
                found.setdefault(run.parent.name, []).append(run)
    if not found:
        raise LymphdxError(
            f"{folder} holds no run with a history.csv (neither a run folder with config.yaml "
            "nor a compare folder with runs/<strategy>/seed<k>/ or "
            "cv/repeat<r>/fold<f>/<strategy>/seed<k>/)"
        )
    return {
        s: sorted(found[s], key=lambda p: natural_key(p.as_posix()))
        for s in strategy_order(list(found))
    }


# --------------------------------------------------------------------------- reading


def _run_name(run: Path) -> str:
    """``seed0`` or ``repeat0/fold1/seed0`` from the path; else the folder's name."""
    parts = [p for p in run.parts[-5:] if _RUN_PART.fullmatch(p)]
    return "/".join(parts) or run.name


def read_history_curve(run: Path) -> dict[str, Any]:
    """One run's curves from ``run/history.csv``.

    Returns a dict with ``name``, ``path``, the per-epoch arrays ``epoch``, ``step``,
    ``val_auc`` and ``strong_val_dice`` (float, NaN where empty), ``step_is_epoch`` (True
    if any row had no ``step`` and ``epoch + 1`` was used), ``warmup_end_step`` (the step
    at the end of the last ``roi-warmup`` epoch, if a later epoch left the warm-up, else
    None) and ``first_propagation_step`` (the step at the start of the first epoch with
    ``propagated`` = 1, i.e. the previous row's step or 0; None if it never propagated).
    Rows are ordered by epoch (a resumed run's repeats: the last row of an epoch wins).
    """
    run = Path(run)
    path = run / HISTORY
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise LymphdxError(f"cannot read {path}: {err.strerror or err}") from None
    by_epoch: dict[int, dict[str, str]] = {}
    for i, row in enumerate(rows):
        e = float_or_nan(row.get("epoch"))
        by_epoch[int(e) if np.isfinite(e) else i] = row
    epochs = sorted(by_epoch)
    rows = [by_epoch[e] for e in epochs]
    raw_step = np.array([float_or_nan(r.get("step")) for r in rows], dtype=float)
    step_is_epoch = bool(np.isnan(raw_step).any())
    step = np.where(np.isnan(raw_step), np.asarray(epochs, dtype=float) + 1, raw_step)
    warm = [r.get("phase") == WARMUP_PHASE for r in rows]
    warmup_end = None
    if any(warm):
        last = max(i for i, w in enumerate(warm) if w)
        if last + 1 < len(rows):
            warmup_end = float(step[last])
    first_prop = None
    for i, r in enumerate(rows):
        if float_or_nan(r.get("propagated")) == 1:
            first_prop = float(step[i - 1]) if i > 0 else 0.0
            break
    return {
        "name": _run_name(run),
        "path": run,
        "epoch": np.asarray(epochs, dtype=float),
        "step": step,
        "val_auc": np.array([float_or_nan(r.get("val_auc")) for r in rows], dtype=float),
        "strong_val_dice": np.array(
            [float_or_nan(r.get("strong_val_dice")) for r in rows], dtype=float
        ),
        "step_is_epoch": step_is_epoch,
        "warmup_end_step": warmup_end,
        "first_propagation_step": first_prop,
    }


def read_curves(run_dirs: dict[str, list[Path]]) -> dict[str, list[dict]]:
    """strategy -> one :func:`read_history_curve` dict per run (runs without a
    ``history.csv``, or with no rows yet, are left out; so is a strategy left with none)."""
    out: dict[str, list[dict]] = {}
    for strategy, runs in run_dirs.items():
        curves = [read_history_curve(Path(r)) for r in runs if (Path(r) / HISTORY).is_file()]
        curves = [c for c in curves if len(c["step"])]
        if curves:
            out[strategy] = curves
    return out


def has_dice(runs: list[dict]) -> bool:
    """Whether any run of a strategy logged a strong-validation Dice."""
    return any(np.isfinite(r["strong_val_dice"]).any() for r in runs)


def mean_curve(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, mean)`` of ``key`` over the runs at the steps all of them logged (NaNs
    ignored; a step where every run has NaN is dropped)."""
    if not runs:
        return np.array([]), np.array([])
    common = set(runs[0]["step"].tolist())
    for r in runs[1:]:
        common &= set(r["step"].tolist())
    steps = np.array(sorted(common), dtype=float)
    values = np.full((len(runs), len(steps)), np.nan)
    for i, r in enumerate(runs):
        index = {s: j for j, s in enumerate(r["step"].tolist())}
        values[i] = [r[key][index[s]] for s in steps.tolist()]
    keep = np.isfinite(values).any(axis=0)
    mean = np.full(len(steps), np.nan)
    mean[keep] = np.nanmean(values[:, keep], axis=0)
    return steps[keep], mean[keep]


# --------------------------------------------------------------------------- summary


def _extreme(run: dict, key: str) -> tuple[float, float, float, float] | None:
    """``(final value, its step, maximum, step of the first maximum)`` or None."""
    v, s = run[key], run["step"]
    ok = np.isfinite(v)
    if not ok.any():
        return None
    last = int(np.flatnonzero(ok)[-1])
    best = int(np.nanargmax(np.where(ok, v, -np.inf)))
    return float(v[last]), float(s[last]), float(v[best]), float(s[best])


def summarize(curves: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per strategy and metric (``val_auc``, ``strong_val_dice``): runs, the
    final value and the maximum with the step they were reached, each the mean over runs
    (steps: the mean step). A metric no run logged is left out."""
    rows = []
    for strategy, runs in curves.items():
        for key in ("val_auc", "strong_val_dice"):
            ex = [e for e in (_extreme(r, key) for r in runs) if e is not None]
            if not ex:
                continue
            a = np.array(ex)
            rows.append(
                {
                    "strategy": strategy,
                    "metric": key,
                    "runs": len(ex),
                    "final": float(a[:, 0].mean()),
                    "final_step": float(a[:, 1].mean()),
                    "max": float(a[:, 2].mean()),
                    "max_step": float(a[:, 3].mean()),
                    "step_is_epoch": any(r["step_is_epoch"] for r in runs),
                }
            )
    return rows


def markdown_table(curves: dict[str, list[dict]]) -> str:
    """:func:`summarize` as a markdown table (for BENCHMARKS.md)."""
    names = {"val_auc": "weak-val AUC", "strong_val_dice": "strong-val Dice"}
    lines = [
        "| strategy | metric | runs | final | at step | max | at step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summarize(curves):
        unit = " (epochs)" if r["step_is_epoch"] else ""
        lines.append(
            f"| {r['strategy']} | {names[r['metric']]} | {r['runs']} | {r['final']:.3f} | "
            f"{r['final_step']:.0f}{unit} | {r['max']:.3f} | {r['max_step']:.0f}{unit} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- figure


def _draw(ax: Any, curves: dict[str, list[dict]], key: str, colors: dict[str, Any]) -> None:
    for strategy, runs in curves.items():
        color = colors[strategy]
        single = len(runs) == 1
        for r in runs:
            ok = np.isfinite(r[key])
            ax.plot(
                r["step"][ok],
                r[key][ok],
                "-",
                color=color,
                lw=2.2 if single else 0.8,
                alpha=1.0 if single else 0.45,
                marker="o" if ok.sum() == 1 else None,
                ms=4,
            )
        label = f"{strategy} ({len(runs)} run{'s' if len(runs) > 1 else ''})"
        steps, mean = mean_curve(runs, key) if not single else (np.array([]), np.array([]))
        if len(steps):
            ax.plot(steps, mean, "-", color=color, lw=2.4, marker="o" if len(steps) == 1 else None)
        ax.plot([], [], "-", color=color, lw=2.4, label=label)
        warm = sorted({r["warmup_end_step"] for r in runs if r["warmup_end_step"] is not None})
        prop = sorted(
            {r["first_propagation_step"] for r in runs if r["first_propagation_step"] is not None}
        )
        for x in warm:
            ax.axvline(x, color=color, ls="--", lw=1.0, alpha=0.8)
        for x in prop:
            ax.axvline(x, color=color, ls=":", lw=1.3, alpha=0.9)
            ax.plot(
                [x],
                [1.0],
                "v",
                color=color,
                ms=7,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )


def learning_curves_figure(curves: dict[str, list[dict]]) -> Any:
    """The two-panel matplotlib figure (weak-validation AUC | strong-validation Dice)
    against training steps; strategies without Dice are left out of the right panel."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    colors = strategy_colors(list(curves))
    fig, (ax_auc, ax_dice) = plt.subplots(1, 2, figsize=(11.0, 4.0))
    _draw(ax_auc, curves, "val_auc", colors)
    dice = {s: runs for s, runs in curves.items() if has_dice(runs)}
    _draw(ax_dice, dice, "strong_val_dice", colors)
    epochs = any(r["step_is_epoch"] for runs in curves.values() for r in runs)
    xlabel = "training steps" + (" (epochs where a run logged no step)" if epochs else "")
    for ax, title in ((ax_auc, "weak-validation AUC"), (ax_dice, "strong-validation Dice")):
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.25)
    if not curves:
        ax_auc.text(0.5, 0.5, "no history.csv", ha="center", transform=ax_auc.transAxes)
    if not dice:
        ax_dice.text(
            0.5,
            0.5,
            "no strategy logged a Dice\n(no ROI loss)",
            ha="center",
            va="center",
            transform=ax_dice.transAxes,
            fontsize=9,
            color="grey",
        )
    marks = [
        Line2D([], [], color="black", lw=0.8, alpha=0.45, label="one run (seed / fold)"),
        Line2D([], [], color="black", lw=2.4, label="mean over runs (shared steps)"),
        Line2D([], [], color="black", ls="--", lw=1.0, label="ROI warm-up ended"),
        Line2D([], [], color="black", ls=":", marker="v", lw=1.3, label="first propagation"),
    ]
    handles, _ = ax_auc.get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(
        handles=handles + marks,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=4,
        fontsize=7.5,
        frameon=False,
    )
    return fig


def plot_learning_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Draw :func:`learning_curves_figure` into the PNG ``path`` (written atomically);
    returns ``path``."""
    path = Path(path)
    fig = learning_curves_figure(curves)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path
