"""The report's figures, each returned as an inline PNG (``data:image/png;base64,...``):
ROC curves with bootstrap bands, the reliability diagram, FROC curves, training curves;
and ``compare``'s ``roc.png``. Colours are fixed per strategy across figures."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import STRATEGIES
from lymphdx.core.files import atomic_path
from lymphdx.reporting.runs import Run, float_or_nan
from lymphdx.reporting.table import label
from lymphdx.stats.metrics import auc
from lymphdx.stats.roc import FPR_GRID, roc_band

__all__ = [
    "CALIBRATION_BINS",
    "FROC_SPLITS",
    "pyplot",
    "png_uri",
    "data_uri",
    "strategy_colors",
    "roc_figure",
    "calibration_figure",
    "froc_figure",
    "history_figure",
    "write_roc_png",
]

CALIBRATION_BINS = 5
FROC_SPLITS = {"strong_test": "ROI set, test split", "weak_test": "label set, test split"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_uri(fig: Any, dpi: int = 100) -> str:
    """A figure as a ``data:image/png;base64,...`` URI (closes the figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return data_uri(buf.getvalue())


def data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI; ``ValueError`` for anything but a PNG."""
    if not png.startswith(_PNG_MAGIC):
        raise ValueError("not a PNG")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def strategy_colors(strategies: Sequence[str]) -> dict[str, Any]:
    """The report's colours: tab10 by the strategy's place in ``STRATEGIES``."""
    cmap = pyplot().get_cmap("tab10")
    fixed = {s: cmap(i) for i, s in enumerate(STRATEGIES)}
    extra = iter(cmap(i) for i in range(len(STRATEGIES), 10))
    return {s: fixed.get(s) or next(extra, "black") for s in strategies}


def roc_figure(
    y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, ci: float, what: str
) -> tuple[str, dict[str, float]]:
    """ROC curves of ``scores`` with ``roc_band``'s bands; the figure and each AUC."""
    from sklearn.metrics import roc_curve

    plt = pyplot()
    colors = strategy_colors(list(scores))
    aucs = {}
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for s, score in scores.items():
        fpr, tpr, _ = roc_curve(y, score)
        lo, hi = roc_band(y, score, n_boot, ci)
        aucs[s] = auc(y, score)
        ax.fill_between(FPR_GRID, lo, hi, step="post", color=colors[s], alpha=0.12, lw=0)
        ax.plot(fpr, tpr, color=colors[s], lw=1.8, label=f"{label(s)} (AUC {aucs[s]:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("1 − specificity (FPR)")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_title(f"ROC, {what}; bands: {ci:.0%} stratified bootstrap ({n_boot}×)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return png_uri(fig), aucs


def calibration_figure(
    y: np.ndarray, scores: dict[str, np.ndarray]
) -> tuple[str, dict[str, dict[str, Any]]]:
    """Reliability diagram (``CALIBRATION_BINS`` equal-width bins) with patients per bin
    below; the figure and, per strategy, its Brier score, bins and counts."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    plt = pyplot()
    colors = strategy_colors(list(scores))
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    fig, (ax, hx) = plt.subplots(
        2, 1, figsize=(5.6, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1.1]}
    )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfectly calibrated")
    stats: dict[str, dict[str, Any]] = {}
    width = (edges[1] - edges[0]) / (len(scores) + 1)
    for i, (s, p) in enumerate(scores.items()):
        p = np.clip(p, 0.0, 1.0)
        frac_pos, mean_pred = calibration_curve(y, p, n_bins=CALIBRATION_BINS, strategy="uniform")
        counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=CALIBRATION_BINS)
        stats[s] = {
            "brier": float(brier_score_loss(y, p)),
            "bins": list(zip(mean_pred.tolist(), frac_pos.tolist(), strict=True)),
            "counts": counts.tolist(),
        }
        ax.plot(
            mean_pred,
            frac_pos,
            "-",
            marker="osD^v<>p*h"[i % 10],
            color=colors[s],
            lw=1.5,
            ms=9 - 1.5 * (i % 4),
            alpha=0.85,
            label=label(s),
        )
        hx.bar(
            edges[:-1] + (i + 0.5) * width + width / 2,
            counts,
            width=width,
            color=colors[s],
            alpha=0.8,
        )
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_ylabel("observed fraction positive")
    ax.set_title(f"Reliability ({CALIBRATION_BINS} equal-width bins)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    for e in edges:
        hx.axvline(e, color="lightgrey", lw=0.6)
    hx.set_xlabel("predicted probability")
    hx.set_ylabel("patients")
    return png_uri(fig), stats


def froc_figure(by_strategy: dict[str, list[Run]]) -> str | None:
    """FROC per ``FROC_SPLITS`` split from the runs' ``detection.json``: the first run's
    step curve and the mean over runs at 1/8…8 FP; None if no run has one."""
    plt = pyplot()
    splits = [
        k
        for k in FROC_SPLITS
        if any(k in (r.detection or {}) for runs in by_strategy.values() for r in runs)
    ]
    if not splits:
        return None
    colors = strategy_colors(list(by_strategy))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.4), squeeze=False)
    xmin = 1 / 16
    for ax, split in zip(axes[0], splits, strict=True):
        xmax = 8.0
        for s, runs in by_strategy.items():
            dets = [r.detection[split] for r in runs if r.detection and split in r.detection]
            dets = [d for d in dets if d["froc"].get("mean_sensitivity") is not None]
            if not dets:
                continue
            curve = dets[0]["froc"]["curve"]
            fps = np.maximum(np.asarray(curve["fps_per_volume"], dtype=float), xmin)
            sens = np.asarray(curve["sensitivity"], dtype=float)
            xmax = max(xmax, float(fps.max()) * 1.1)
            ax.plot(
                np.append(fps, xmax),
                np.append(sens, sens[-1]),
                drawstyle="steps-post",
                color=colors[s],
                lw=1.5,
                label=f"{label(s)} ({runs[0].name})",
            )
            rates = dets[0]["froc"]["fp_rates"]
            mean_at = np.mean([d["froc"]["sensitivity"] for d in dets], axis=0)
            ax.plot(
                rates,
                mean_at,
                "o",
                color=colors[s],
                ms=5,
                mfc="white",
                label=f"mean of {len(dets)} run(s) at 1/8…8 FP",
            )
        ax.set_xscale("log", base=2)
        ax.set(xlim=(xmin, xmax), ylim=(-0.02, 1.02))
        ax.set_xlabel("false positives per volume")
        ax.set_ylabel("lesion sensitivity")
        ax.set_title(f"FROC, {FROC_SPLITS[split]}", fontsize=9)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    return png_uri(fig)


def history_figure(strategy: str, runs: list[Run]) -> str | None:
    """Loss and validation AUC per epoch of a strategy's runs (``history.csv``), the
    selected epoch starred; None if no run has a history."""
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    fig, (lx, ax) = plt.subplots(1, 2, figsize=(9.6, 3.2))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(runs):
        color = cmap(i % 10)
        ep = np.array([float_or_nan(h.get("epoch")) for h in r.history])
        dots = {"marker": "o" if len(ep) < 30 else None, "ms": 3}
        for axis, column, style, extra in (
            (lx, "loss", "-", dots),
            (lx, "loss_cls", ":", {"lw": 1.2}),
            (lx, "val_loss", "--", dots),
            (ax, "val_auc", "-", {**dots, "label": r.name if i < 10 else None}),
        ):
            values = [float_or_nan(h.get(column)) for h in r.history]
            axis.plot(ep, values, style, color=color, **extra)
        if r.metrics and "best_epoch" in r.metrics:
            ax.plot(
                [r.metrics["best_epoch"]],
                [r.metrics.get("best_val_auc", np.nan)],
                "*",
                ms=11,
                color=color,
                mec="black",
                mew=0.6,
            )
    lx.set_xlabel("epoch")
    lx.set_ylabel("loss")
    lx.set_title(f"{label(strategy)}: loss", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation AUC (weak set)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("validation AUC (★ selected epoch)", fontsize=9)
    from matplotlib.lines import Line2D

    styles = [
        ("-", "train, all loss terms"),
        (":", "train, classification"),
        ("--", "validation, classification"),
    ]
    lx.legend(
        [Line2D([], [], ls=ls, color="black", lw=1.2) for ls, _ in styles],
        [text for _, text in styles],
        fontsize=6.5,
    )
    if len(runs) <= 10:
        ax.legend(fontsize=6.5)
    else:
        ax.text(0.02, 0.03, f"{len(runs)} runs (first 10 labelled)", transform=ax.transAxes)
    epochs = [float_or_nan(h.get("epoch")) for r in runs for h in r.history]
    epochs = [e for e in epochs if np.isfinite(e)] or [0.0]
    for a in (lx, ax):
        a.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        span = max(epochs) - min(epochs)
        a.xaxis.set_major_locator(MultipleLocator(1) if span < 8 else MaxNLocator(integer=True))
    fig.tight_layout()
    return png_uri(fig)


def write_roc_png(
    path: Path, predictions: dict[str, dict[Any, dict[str, tuple[int, float]]]]
) -> None:
    """``compare``'s ``roc.png``: each strategy's ROC of its scores averaged over seeds
    (``strategy -> seed -> patient -> (label, probability)``)."""
    plt = pyplot()
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
