"""``report``: one self-contained HTML page for a run folder or a compare folder.

``write_report(FOLDER)`` writes ``FOLDER/report.html`` (figures inline as base64 PNG, no
external CSS or JavaScript) and ``FOLDER/report_predictions.csv`` (one row per test
patient: label and the seed-averaged probability of every strategy). The page holds:

1. Table I (from ``results.json``; for a single run its ``metrics.json``), the paired
   tests with their ΔAUC intervals and DeLong p-values, and the power statements;
2. ROC curves of the seed-averaged scores with 95% bands: the TPR at a fixed FPR grid
   (the step ROC's maximum TPR with FPR ≤ f) over a patient bootstrap stratified by
   class;
3. calibration: a reliability diagram (5 equal-width bins) and the Brier score
   (``sklearn.metrics.brier_score_loss``) of the seed-averaged scores;
4. FROC curves from the runs' ``detection.json`` (when the strategy trains the decoder);
5. the per-patient predictions (``report_predictions.csv``, linked and shown);
6. overlays (``lymphdx.workflows.predict.predict``) of the best-AUC strategy's first run on its
   highest-probability test patient and its most wrong one (largest |label − p|);
7. training curves (``history.csv``) per strategy, seeds overlaid;
8. learning curves (``lymphdx.reporting.curves``): weak-validation AUC and strong-validation
   Dice of every run against training steps, one colour per strategy;
9. the items a CLAIM / TRIPOD+AI reviewer asks for (data, splits, seeds, sample sizes,
   model selection, preprocessing, model, training, software, dates).

Nothing here trains or chooses anything; the test split is only read.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import platform
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lymphdx.core.config import STRATEGIES
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_text
from lymphdx.reporting.curves import learning_curves_figure, read_curves
from lymphdx.stats.metrics import _stratified_resamples, auc
from lymphdx.workflows.compare import data_sets, label, test_split_note
from lymphdx.workflows.evaluate import read_predictions

__all__ = [
    "write_report",
    "folder_kind",
    "tpr_at_fpr",
    "roc_band",
    "seed_averaged",
    "REPORT_FILE",
    "PREDICTIONS_FILE",
]

REPORT_FILE = "report.html"
PREDICTIONS_FILE = "report_predictions.csv"
FPR_GRID = np.linspace(0.0, 1.0, 101)
CALIBRATION_BINS = 5
BOOTSTRAP_SEED = 0
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One run folder as the report reads it (raw YAML config, nothing validated)."""

    path: Path
    name: str  # display name within its strategy, e.g. "seed0" or "repeat0/fold1/seed0"
    config: dict[str, Any]
    strategy: str
    seed: int
    metrics: dict[str, Any] | None
    detection: dict[str, Any] | None
    history: list[dict[str, str]]
    predictions: dict[str, tuple[int, float]] | None


@dataclass
class Inputs:
    folder: Path
    kind: str  # "compare" or "run"
    results: dict[str, Any] | None
    runs: list[Run]
    # strategy -> seed key -> patient_id -> (label, probability)
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]]


def folder_kind(folder: str | Path) -> str:
    """``"compare"`` (has ``results.json``) or ``"run"`` (has ``config.yaml``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LymphdxError(f"{folder} is not a folder")
    if (folder / "results.json").is_file():
        return "compare"
    if (folder / "config.yaml").is_file():
        return "run"
    raise LymphdxError(
        f"{folder} is neither a lymphdx compare folder (no results.json) nor a run folder "
        "(no config.yaml); give the --out folder of `lymphdx compare` or `lymphdx train`"
    )


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LymphdxError(f"cannot read {path}: {err}") from None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load_run(path: Path, root: Path) -> Run:
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LymphdxError(f"cannot read {path / 'config.yaml'}: {err}") from None
    strategy = str(config.get("strategy", "?"))
    seed = int(config.get("seed", 0))
    if path == root:
        name = f"seed{seed}"
    else:
        parts = [p for p in path.relative_to(root).parts if p not in ("runs", "cv", strategy)]
        name = "/".join(parts) or f"seed{seed}"
    preds_path = path / "predictions_test.csv"
    return Run(
        path=path,
        name=name,
        config=config,
        strategy=strategy,
        seed=seed,
        metrics=_read_json(path / "metrics.json"),
        detection=_read_json(path / "detection.json"),
        history=_read_csv(path / "history.csv"),
        predictions=read_predictions(preds_path) if preds_path.is_file() else None,
    )


def _strategy_order(names: Sequence[str], preferred: Sequence[str] = ()) -> list[str]:
    order = list(preferred) + [s for s in STRATEGIES if s not in preferred]
    return sorted(set(names), key=lambda s: (order.index(s) if s in order else len(order), s))


def _load(folder: Path) -> Inputs:
    kind = folder_kind(folder)
    if kind == "run":
        run = _load_run(folder, folder)
        if run.predictions is None:
            raise LymphdxError(
                f"run folder {folder} has no predictions_test.csv; run "
                f"`lymphdx evaluate {folder}` first"
            )
        return Inputs(folder, kind, None, [run], {run.strategy: {str(run.seed): run.predictions}})
    results = _read_json(folder / "results.json") or {}
    if "strategies" not in results:
        raise LymphdxError(f"{folder / 'results.json'} has no 'strategies'")
    preferred = list(results["strategies"])
    runs = [
        _load_run(p.parent, folder)
        for p in folder.rglob("config.yaml")
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    order = _strategy_order([r.strategy for r in runs] + preferred, preferred)
    runs.sort(key=lambda r: (order.index(r.strategy), _natural_key(r.name)))
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]] = {}
    rows = _read_csv(folder / "test_predictions.csv")
    if rows:
        for r in rows:
            predictions.setdefault(r["strategy"], {}).setdefault(r["seed"], {})[r["patient_id"]] = (
                int(r["label"]),
                float(r["probability"]),
            )
    else:  # an older compare folder: the runs' own per-patient files (CV: folds pooled)
        for run in runs:
            if run.predictions is not None:
                key = re.sub(r"(^|/)fold\d+(?=/|$)", "", run.name).strip("/") or run.name
                predictions.setdefault(run.strategy, {}).setdefault(key, {}).update(run.predictions)
    if not predictions:
        raise LymphdxError(f"{folder} has no test_predictions.csv and no run predictions")
    predictions = {s: predictions[s] for s in _strategy_order(list(predictions), preferred)}
    return Inputs(folder, kind, results, runs, predictions)


def seed_averaged(
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]],
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Patients (sorted), labels and each strategy's probability averaged over seeds.

    Only patients that every strategy and seed scored are kept (all of them, for the
    output of ``compare``)."""
    common: set[str] | None = None
    labels: dict[str, int] = {}
    for by_seed in predictions.values():
        for rows in by_seed.values():
            common = set(rows) if common is None else common & set(rows)
            labels.update({p: lab for p, (lab, _) in rows.items()})
    patients = sorted(common or ())
    if not patients:
        raise LymphdxError("no test patient is scored by every strategy and seed")
    y = np.array([labels[p] for p in patients], dtype=int)
    scores = {
        s: np.mean([[rows[p][1] for p in patients] for rows in by_seed.values()], axis=0)
        for s, by_seed in predictions.items()
    }
    return patients, y, scores


# --------------------------------------------------------------------------- statistics


def _tpr_at_fpr_rows(pos: np.ndarray, neg: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``(B, G)``: for rows of positive ``(B, P)`` and negative ``(B, Q)`` scores, the
    largest TPR of a threshold whose FPR is ≤ each grid value (the step ROC)."""
    n_neg = neg.shape[1]
    neg_desc = -np.sort(-neg, axis=1)
    allowed = np.floor(np.asarray(grid) * n_neg + 1e-9).astype(int)  # negatives allowed above t
    cut = neg_desc[:, np.minimum(allowed, n_neg - 1)]  # t must lie above this score
    out = np.empty((pos.shape[0], len(grid)))
    step = max(1, 20_000_000 // max(1, len(grid) * pos.shape[1]))
    for start in range(0, pos.shape[0], step):
        sl = slice(start, start + step)
        out[sl] = (pos[sl, None, :] > cut[sl, :, None]).mean(axis=2)
    out[:, allowed >= n_neg] = 1.0
    return out


def tpr_at_fpr(y: np.ndarray, scores: np.ndarray, grid: np.ndarray = FPR_GRID) -> np.ndarray:
    """Largest sensitivity with 1 − specificity ≤ ``grid`` (ties handled exactly): equals
    ``max(tpr[fpr <= f])`` of ``sklearn.metrics.roc_curve``."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    auc(y, s)  # raises for a one-class set
    return _tpr_at_fpr_rows(s[y == 1][None], s[y == 0][None], grid)[0]


def roc_band(
    y: np.ndarray,
    scores: np.ndarray,
    n: int = 2000,
    ci: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
    grid: np.ndarray = FPR_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of the TPR at ``grid`` over a class-stratified patient
    bootstrap (the resampling of :func:`lymphdx.stats.metrics.bootstrap_auc_ci`)."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    auc(y, s)
    idx = _stratified_resamples(y, n, seed)  # positives first, then negatives
    n_pos = int(y.sum())
    tpr = _tpr_at_fpr_rows(s[idx[:, :n_pos]], s[idx[:, n_pos:]], grid)
    lo, hi = np.quantile(tpr, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=0)
    return lo, hi


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, dpi: int = 100) -> str:
    """A figure as a ``data:image/png;base64,...`` URI (closes the figure)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return _data_uri(buf.getvalue())


def _data_uri(png: bytes) -> str:
    if not png.startswith(_PNG_MAGIC):
        raise ValueError("not a PNG")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _label(strategy: str) -> str:
    return label(strategy)


def _colors(strategies: Sequence[str]) -> dict[str, Any]:
    cmap = _plt().get_cmap("tab10")
    fixed = {s: cmap(i) for i, s in enumerate(STRATEGIES)}
    extra = iter(cmap(i) for i in range(len(STRATEGIES), 10))
    return {s: fixed.get(s) or next(extra, "black") for s in strategies}


def _roc_figure(
    y: np.ndarray, scores: dict[str, np.ndarray], n_boot: int, ci: float, what: str
) -> tuple[str, dict[str, float]]:
    from sklearn.metrics import roc_curve

    plt = _plt()
    colors = _colors(list(scores))
    aucs = {}
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    for s, score in scores.items():
        fpr, tpr, _ = roc_curve(y, score)
        lo, hi = roc_band(y, score, n_boot, ci)
        aucs[s] = auc(y, score)
        ax.fill_between(FPR_GRID, lo, hi, step="post", color=colors[s], alpha=0.12, lw=0)
        ax.plot(fpr, tpr, color=colors[s], lw=1.8, label=f"{_label(s)} (AUC {aucs[s]:.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("1 − specificity (FPR)")
    ax.set_ylabel("sensitivity (TPR)")
    ax.set_title(f"ROC, {what}; bands: {ci:.0%} stratified bootstrap ({n_boot}×)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig), aucs


def _calibration(
    y: np.ndarray, scores: dict[str, np.ndarray]
) -> tuple[str, dict[str, dict[str, Any]]]:
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    plt = _plt()
    colors = _colors(list(scores))
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
            label=_label(s),
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
    return _png(fig), stats


_FROC_SPLITS = {"strong_test": "ROI set, test split", "weak_test": "label set, test split"}


def _froc_figure(by_strategy: dict[str, list[Run]]) -> str | None:
    plt = _plt()
    splits = [
        k
        for k in _FROC_SPLITS
        if any(k in (r.detection or {}) for runs in by_strategy.values() for r in runs)
    ]
    if not splits:
        return None
    colors = _colors(list(by_strategy))
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
                label=f"{_label(s)} ({runs[0].name})",
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
        ax.set_title(f"FROC, {_FROC_SPLITS[split]}", fontsize=9)
        ax.legend(fontsize=6.5, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def _float(v: str | None) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except ValueError:
        return float("nan")


def _history_figure(strategy: str, runs: list[Run]) -> str | None:
    runs = [r for r in runs if r.history]
    if not runs:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator, MultipleLocator

    fig, (lx, ax) = plt.subplots(1, 2, figsize=(9.6, 3.2))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(runs):
        color = cmap(i % 10)
        ep = np.array([_float(h.get("epoch")) for h in r.history])
        marker = "o" if len(ep) < 30 else None
        show = i < 10
        lx.plot(
            ep,
            [_float(h.get("loss")) for h in r.history],
            "-",
            marker=marker,
            ms=3,
            color=color,
        )
        lx.plot(
            ep,
            [_float(h.get("loss_cls")) for h in r.history],
            ":",
            lw=1.2,
            color=color,
        )
        lx.plot(
            ep,
            [_float(h.get("val_loss")) for h in r.history],
            "--",
            marker=marker,
            ms=3,
            color=color,
        )
        ax.plot(
            ep,
            [_float(h.get("val_auc")) for h in r.history],
            "-",
            marker=marker,
            ms=3,
            color=color,
            label=r.name if show else None,
        )
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
    lx.set_title(f"{_label(strategy)}: loss", fontsize=9)
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
    epochs = [_float(h.get("epoch")) for r in runs for h in r.history]
    epochs = [e for e in epochs if np.isfinite(e)] or [0.0]
    for a in (lx, ax):
        a.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        span = max(epochs) - min(epochs)
        a.xaxis.set_major_locator(MultipleLocator(1) if span < 8 else MaxNLocator(integer=True))
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- overlays


def _image_of(manifest: Path, patient_id: str) -> Path:
    """The patient's image path from a weak manifest (``load_weak_manifest``; if another
    row of it is broken, the patient's own row)."""
    from lymphdx.data.manifest import load_weak_manifest

    try:
        for rec in load_weak_manifest(manifest):
            if rec.patient_id == patient_id:
                return rec.image
        raise LymphdxError(f"patient {patient_id!r} is not in the weak manifest {manifest}")
    except LymphdxError:
        for row in _read_csv(manifest):
            if row.get("patient_id") == patient_id and row.get("image"):
                path = Path(row["image"]).expanduser()
                return path if path.is_absolute() else manifest.parent / path
        raise


def _overlay(run: Run, patient_id: str) -> tuple[str | None, str]:
    """``(data URI or None, note)`` of the run's overlay for one weak-set patient."""
    if not (run.path / "checkpoints" / "best.pt").is_file():
        return None, f"no overlay: the checkpoint {run.path / 'checkpoints' / 'best.pt'} is missing"
    manifest = (run.config.get("manifests") or {}).get("weak")
    if not manifest:
        return None, "no overlay: config.yaml names no weak manifest"
    manifest = Path(manifest)
    if not manifest.is_file():
        return None, f"no overlay: the weak manifest {manifest} is missing"
    try:
        image = _image_of(manifest, patient_id)
    except LymphdxError as err:
        return None, f"no overlay: {err}"
    if not image.exists():
        return None, f"no overlay: the image {image} is missing"
    from lymphdx.workflows.predict import predict

    with tempfile.TemporaryDirectory(prefix="lymphdx-report-") as tmp:
        try:
            result = predict(run.path, [image], tmp)[0]
        except (LymphdxError, OSError, RuntimeError, KeyError, ValueError) as err:
            return None, f"no overlay: predicting {image} failed: {err}"
        png = next(Path(tmp).rglob("overlay.png"), None)
        if png is None:
            return None, "no overlay: lymphdx.workflows.predict.predict wrote no overlay.png"
        uri = _data_uri(png.read_bytes())
    note = (
        f"image {image}; probability recomputed now {result['probability']:.3f}, "
        f"ROI voxels > ζ: {result['roi_voxels']}, axial slice {result['overlay_slice']}"
    )
    return uri, note


# --------------------------------------------------------------------------- HTML helpers


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", raw: bool = False
) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    cell = (lambda c: str(c)) if raw else _e
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(uri: str, alt: str, cls: str = "") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}">'


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ci(c: Sequence[float] | None, sign: bool = False) -> str:
    if not c:
        return "—"
    f = "+.3f" if sign else ".3f"
    return f"[{c[0]:{f}}, {c[1]:{f}}]"


def _kv(d: dict[str, Any] | None) -> str:
    """A config section as ``key = value`` lines (nested sections flattened)."""
    if not d:
        return "—"
    out = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}{k}.", w)
        else:
            shown = "[" + ", ".join(map(str, v)) + "]" if isinstance(v, list) else v
            out.append(f"{prefix[:-1]} = {shown}")

    walk("", d)
    return "<br>".join(_e(x) for x in out)


# --------------------------------------------------------------------------- sections


def _table_one(inp: Inputs) -> str:
    res = inp.results or {}
    strategies = res.get("strategies", {})
    tests = res.get("paired_tests", {})
    cv = res.get("mode") == "cv"
    parts = []
    if cv:
        parts.append(
            f"<p>Pooled out-of-fold AUC over all {res['n_test']} labelled weak-set patients "
            f"({res['n_test_pos']} positive): stratified {res.get('cv')}-fold cross-validation "
            f"× {res.get('repeats')} repeat(s), training seeds {_e(res.get('training_seeds'))}; "
            f"mean ± sd over the {len(res.get('seeds', []))} pooled AUCs.</p>"
        )
    else:
        parts.append(
            f"<p>Classification AUC on the weak set's test split (n = {res.get('n_test')}, "
            f"{res.get('n_test_pos')} positive), {len(res.get('seeds', []))} seed(s) "
            f"{_e(res.get('seeds'))}. 95% CI: stratified patient bootstrap of the seed-mean "
            "AUC.</p>"
        )
    rows = []
    for s, r in strategies.items():
        t = tests.get(f"{s} vs supervised")
        per = (
            f"folds {r['fold_auc_mean']:.3f} ± {r['fold_auc_sd']:.3f}"
            if cv and "fold_auc_mean" in r
            else ", ".join(f"{a:.3f}" for a in r.get("test_auc", []))
        )
        rows.append(
            [
                _label(s),
                data_sets(s),
                f"{r['test_auc_mean']:.3f} ± {r['test_auc_sd']:.3f}",
                per,
                _ci(r.get("test_auc_ci95")),
                f"{t['delta_auc']:+.3f} {_ci(t['delta_ci95'], True)}" if t else "—",
                f"{t['p_delong']:.3f}" if t else "—",
                _fmt(r.get("paper_auc"), 2),
            ]
        )
    parts.append(
        _table(
            [
                "Training method for the classifier",
                "Data sets",
                "AUC mean ± sd",
                "per-fold" if cv else "per-seed AUC",
                "95% CI",
                "ΔAUC vs supervised [95% CI]",
                "p (DeLong)",
                "paper",
            ],
            rows,
            "tableone",
        )
    )
    detected = {s: r["detection"] for s, r in strategies.items() if r.get("detection")}
    if detected:
        keys = (
            "strong_test_dice_mean",
            "strong_test_froc_mean_sensitivity_mean",
            "weak_test_dice_mean",
            "weak_test_froc_mean_sensitivity_mean",
        )
        parts.append(
            "<p>Detection: Dice of the ROI mask (&gt; ζ) and lesion-level FROC mean "
            "sensitivity at 1/8–8 false positives per volume, mean over runs (seeds, or "
            "folds × seeds under cross-validation).</p>"
        )
        parts.append(
            _table(
                [
                    "Strategy",
                    "ROI-set test Dice",
                    "ROI-set FROC",
                    "label-set Dice",
                    "label-set FROC",
                ],
                [[_label(s)] + [_fmt(d.get(k)) for k in keys] for s, d in detected.items()],
            )
        )
    if tests:
        parts.append("<h3>Paired tests</h3>")
        parts.append(
            _table(
                [
                    "Comparison (A vs B)",
                    "ΔAUC (A − B)",
                    "95% CI (paired bootstrap)",
                    "p (DeLong, seed-averaged scores)",
                    "p per seed",
                    "power",
                    "n for 80% power",
                    "supports a claim",
                ],
                [
                    [
                        name,
                        f"{t['delta_auc']:+.3f}",
                        _ci(t.get("delta_ci95"), True),
                        f"{t['p_delong']:.3f}",
                        ", ".join(f"{p:.3f}" for p in t.get("p_delong_per_seed", [])),
                        _fmt(t.get("power"), 2),
                        _fmt(t.get("n_for_80_power")),
                        "yes" if t.get("supports_claim") else "no",
                    ]
                    for name, t in tests.items()
                ],
            )
        )
        texts = [(n, t["power_text"]) for n, t in tests.items() if t.get("power_text")]
        if texts:
            parts.append("<h3>Power</h3><ul>")
            parts += [f"<li><b>{_e(n)}</b>: {_e(text)}</li>" for n, text in texts]
            parts.append("</ul>")
    widths = [r["test_auc_ci95"][1] - r["test_auc_ci95"][0] for r in strategies.values()]
    if widths:
        parts.append(
            f'<p class="note">The 95% intervals are {min(widths):.2f}–{max(widths):.2f} wide: '
            f"with {res.get('n_test')} test patients, AUC differences smaller than that are not "
            "distinguishable from chance; read ΔAUC by its interval and p, not by its sign.</p>"
        )
    if strategies and res.get("n_test_pos") is not None:
        note = test_split_note(res)
        if note:
            parts.append(f'<p class="warn">{_e(note)}</p>')
    return "\n".join(parts)


def _run_metrics(run: Run) -> str:
    m = run.metrics or {}
    if not m:
        return '<p class="warn">No metrics.json (run <code>lymphdx evaluate</code>).</p>'
    rows = [
        ["strategy", _label(run.strategy)],
        ["seed", m.get("seed", run.seed)],
        ["split", m.get("split")],
        ["patients (positive)", f"{m.get('n')} ({m.get('n_pos')})"],
        ["AUC", _fmt(m.get("auc"))],
        ["95% CI (stratified bootstrap)", _ci(m.get("auc_ci95"))],
        ["SE (DeLong)", _fmt(m.get("auc_se_delong"))],
        ["threshold", _fmt(m.get("threshold"), 2)],
        [
            "sensitivity / specificity",
            f"{_fmt(m.get('sensitivity'))} / {_fmt(m.get('specificity'))}",
        ],
        ["accuracy", _fmt(m.get("accuracy"))],
        ["selected epoch (val AUC)", f"{m.get('best_epoch')} ({_fmt(m.get('best_val_auc'))})"],
    ]
    for k in sorted(m):
        if k.endswith("_dice") or k.endswith("_froc_mean_sensitivity"):
            rows.append([k.replace("_", " "), _fmt(m[k])])
    return _table(["metric", "value"], rows, "kv")


def _splits_summary(runs: list[Run], folder: Path) -> tuple[str, dict[str, Any]]:
    """Counts per set × split (weak positives) from the runs' splits.csv."""
    info: dict[str, Any] = {}
    tables = {}
    for r in runs:
        rows = _read_csv(r.path / "splits.csv")
        if rows:
            key = tuple(sorted((x["set"], x["patient_id"], x["split"]) for x in rows))
            tables.setdefault(key, (r, rows))
    if not tables and (folder / "splits.csv").is_file():
        tables[()] = (None, _read_csv(folder / "splits.csv"))
    if not tables:
        return "no splits.csv found", info
    _, rows = next(iter(tables.values()))
    counts: dict[tuple[str, str], list[int]] = {}
    ids: dict[str, dict[str, set[str]]] = {}
    for x in rows:
        c = counts.setdefault((x["set"], x["split"]), [0, 0])
        c[0] += 1
        c[1] += x.get("label") == "1"
        ids.setdefault(x["set"], {}).setdefault(x["patient_id"], set()).add(x["split"])
    lines = []
    for set_name in ("weak", "strong"):
        cells = []
        for split in ("train", "val", "test"):
            n, pos = counts.get((set_name, split), [0, 0])
            cells.append(f"{split} {n}" + (f" ({pos} pos.)" if set_name == "weak" else ""))
        total = sum(v[0] for (s, _), v in counts.items() if s == set_name)
        what = "label (weak) set" if set_name == "weak" else "ROI (strong) set"
        lines.append(f"{what}: {total} patients — " + ", ".join(cells))
    multi = sum(len(v) > 1 for d in ids.values() for v in d.values())
    both = len(set(ids.get("weak", {})) & set(ids.get("strong", {})))
    info.update(n_layouts=len(tables), multi=multi, both=both)
    return "<br>".join(_e(x) for x in lines), info


def _versions() -> str:
    out = []
    for pkg in ("lymphdx", "torch", "monai", "numpy", "scikit-learn", "SimpleITK", "matplotlib"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    out.append(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    return ", ".join(out)


def _mtime(path: Path) -> str:
    return (
        _dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    )


def _checklist(inp: Inputs, n_boot: int, ci: float) -> str:
    runs = inp.runs
    res = inp.results or {}
    first = runs[0] if runs else None
    cfg = first.config if first else {}
    data = cfg.get("data") or {}
    manifests = cfg.get("manifests") or {}
    split_html, split_info = _splits_summary(runs, inp.folder)
    cv = res.get("mode") == "cv"
    # how the split was made
    weak_csv = Path(manifests["weak"]) if manifests.get("weak") else None
    has_split_col = False
    if weak_csv is not None and weak_csv.is_file():
        with open(weak_csv, newline="") as f:
            has_split_col = "split" in (next(csv.reader(f), []) or [])
    sp = data.get("split") or {}
    seeded = (
        f"seeded patient-wise split (data.split_seed = {data.get('split_seed')}), weak set "
        f"stratified by label, proportions weak {sp.get('weak')} / strong "
        f"{sp.get('strong')} (train/val/test)"
    )
    if cv:
        how = (
            f"repeated stratified {res.get('cv')}-fold cross-validation × {res.get('repeats')} "
            f"repeat(s) over all labelled weak-set patients (seed data.split_seed = "
            f"{data.get('split_seed')}); in each fold a stratified part of the training folds is "
            "the validation split; the ROI set keeps one fixed split (splits.csv of the compare "
            "folder). Each fold's split is in its run's splits.csv "
            f"({split_info.get('n_layouts', 0)} distinct layouts; counts below: the first fold)."
        )
    elif inp.kind == "run":
        source = "the manifest's split column" if has_split_col else seeded
        how = f"{source}; saved as splits.csv in the run folder (reused on --resume)."
    else:
        source = "the manifest's split column" if has_split_col else seeded
        same = split_info.get("n_layouts", 0)
        how = (
            f"{source}; saved as splits.csv in every run folder and reused by every strategy and "
            + (
                f"seed (identical in all {len(runs)} runs)."
                if same == 1
                else f"seed ({same} different splits.csv files!)."
            )
        )
    checks = (
        f"Patients listed in more than one split: {split_info.get('multi', '?')}; patient ids "
        f"present in both sets: {split_info.get('both', '?')}."
    )
    seeds_train = sorted({r.seed for r in runs})
    if res:
        n_test, n_pos = res.get("n_test"), res.get("n_test_pos")
    else:
        n_test = (first.metrics or {}).get("n") if first else None
        n_pos = (first.metrics or {}).get("n_pos") if first else None
    n_neg = None if n_test is None or n_pos is None else n_test - n_pos
    sizes = f"test patients {n_test} ({n_pos} positive, {n_neg} negative)"
    needed = {
        k: v["n_for_80_power"]
        for k, v in res.get("paired_tests", {}).items()
        if v.get("n_for_80_power") is not None
    }
    if needed:
        sizes += "; test patients needed for 80% power of the paired DeLong test: " + ", ".join(
            f"{k}: {v}" for k, v in needed.items()
        )
    chosen: dict[str, list[str]] = {}
    for r in runs:
        if r.metrics and "best_epoch" in r.metrics:
            chosen.setdefault(r.strategy, []).append(
                f"{r.metrics['best_epoch']} ({_fmt(r.metrics.get('best_val_auc'), 2)})"
            )
    best = "; ".join(f"{s}: {', '.join(v)}" for s, v in chosen.items())
    selection = (
        "Checkpoint with the best validation AUC on the weak set's val split (ties: lower "
        "validation loss), saved as checkpoints/best.pt; the test split is scored once per run "
        "after training and never used for any choice (epoch, strategy, threshold). Selected "
        f"epochs (validation AUC), run by run: {best or '—'}. Decision threshold "
        f"{(cfg.get('evaluation') or {}).get('threshold')} fixed in the config."
    )
    prep = dict(data)
    prep.pop("split", None)
    prep.pop("split_seed", None)
    pre_html = (
        _kv(prep)
        + "<br>"
        + _e(
            "intensity: clipped to hu_window, then z-score per domain (hospital) from each set's "
            "training split (normalization.json); resampled once onto a canonical grid with "
            "identity direction"
        )
    )
    training = dict(cfg.get("training") or {})
    train_html = _kv(training) + "<br>" + _kv({"propagation": cfg.get("propagation")})
    params = _parameter_count(first) if first else None
    model_html = _kv(cfg.get("model")) + (
        f"<br>{params:,} trainable parameters (best.pt)" if params else ""
    )
    evaluation = (
        f"AUC (scikit-learn) with {ci:.0%} class-stratified patient bootstrap CIs "
        f"({n_boot} resamples); DeLong's paired test; "
        "ROC bands: pointwise bootstrap of TPR at fixed FPR; calibration: Brier score and "
        f"{CALIBRATION_BINS}-bin reliability diagram; detection: Dice and lesion-level FROC"
    )
    dates = f"report written {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}"
    for name in ("results.json", "metrics.json"):
        if (inp.folder / name).is_file():
            dates += f"; {name} written {_mtime(inp.folder / name)}"
    rows = [
        [
            "Data sources",
            _e(
                f"label (weak) set manifest: {manifests.get('weak')}; ROI (strong) set manifest: "
                f"{manifests.get('strong')} (two sources, each labelled for one task)"
            ),
        ],
        ["Patients per set and split", split_html],
        [
            "Split level and how it was made",
            _e("patient-wise (one manifest row per patient, one split per patient); " + how)
            + "<br>"
            + _e(checks),
        ],
        [
            "Seeds",
            _e(
                f"training seeds {seeds_train}; split seed {data.get('split_seed')}; "
                f"report bootstrap seed {BOOTSTRAP_SEED}"
            ),
        ],
        ["Sample sizes", _e(sizes)],
        ["Model selection", _e(selection)],
        ["Preprocessing", pre_html],
        ["Model", model_html],
        ["Training", train_html],
        ["Evaluation", _e(evaluation)],
        ["Software", _e(_versions())],
        ["Date", _e(dates)],
    ]
    return _table(["Item (CLAIM / TRIPOD+AI)", "This study"], rows, "kv checklist", raw=True)


def _parameter_count(run: Run) -> int | None:
    path = run.path / "checkpoints" / "best.pt"
    if not path.is_file():
        return None
    try:
        from lymphdx.engine.trainer import load_checkpoint

        state = load_checkpoint(path)
        return int(
            sum(
                v.numel()
                for k, v in state["model"].items()
                if "running_" not in k and "num_batches" not in k
            )
        )
    except (LymphdxError, OSError, RuntimeError, KeyError, AttributeError):
        return None


# --------------------------------------------------------------------------- page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:0 18px 40px;color:#222;line-height:1.4;font-size:14px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:2px solid #ddd;
padding-bottom:3px;margin-top:28px}h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top;text-align:left}
th{background:#f2f2f2}table.kv td:first-child{font-weight:600;white-space:nowrap}
table.tableone td:nth-child(n+3){white-space:nowrap}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.figs figure{margin:0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555;max-width:560px}
.note{color:#555;font-size:12px}.warn{color:#a40}
nav a{margin-right:12px}code{background:#f4f4f4;padding:0 3px}
details{margin:6px 0}
"""

_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesOk = ok ? "1" : "0";
  document.body.dataset.imagesCount = String(imgs.length);
});
</script>
"""


def _write_predictions_csv(
    path: Path, patients: list[str], y: np.ndarray, scores: dict[str, np.ndarray]
) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient_id", "label", *scores])
    for i, pid in enumerate(patients):
        w.writerow([pid, int(y[i]), *(f"{scores[s][i]:.6f}" for s in scores)])
    write_text(path, buf.getvalue())
    return buf.getvalue()


def _evaluation_settings(runs: list[Run]) -> tuple[int, float]:
    for r in runs:
        ev = r.config.get("evaluation") or {}
        if "bootstrap" in ev:
            return int(ev["bootstrap"]), float(ev.get("ci", 0.95))
    return 2000, 0.95


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` and ``report_predictions.csv`` into a run or compare folder;
    returns the HTML's path. Raises ``LymphdxError`` for any other folder."""
    folder = Path(path)
    inp = _load(folder)
    patients, y, scores = seed_averaged(inp.predictions)
    n_boot, ci = _evaluation_settings(inp.runs)
    by_strategy: dict[str, list[Run]] = {}
    for r in inp.runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    n_seeds = {s: len(v) for s, v in inp.predictions.items()}
    seed_note = ", ".join(f"{_label(s)}: {k}" for s, k in n_seeds.items())

    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)

    # 1. Table I
    if inp.kind == "compare":
        sections.append(("table", "Table I: classification AUC", _table_one(inp)))
    else:
        sections.append(("table", "Test metrics", _run_metrics(inp.runs[0])))

    # 2. ROC, 3. calibration
    two_classes = 0 < y.sum() < len(y)
    if two_classes:
        averaged = any(len(v) > 1 for v in inp.predictions.values())
        what = "seed-averaged scores" if averaged else "test split"
        roc_uri, aucs = _roc_figure(y, scores, n_boot, ci, what)
        cal_uri, cal = _calibration(y, scores)
        prevalence = float(y.mean())
        roc_body = (
            f'<div class="figs"><figure>{_img(roc_uri, "ROC curves", "roc")}<figcaption>'
            f"Scores averaged over seeds ({_e(seed_note)} per strategy) on {len(y)} test "
            f"patients ({int(y.sum())} positive). Bands: pointwise {ci:.0%} percentile interval "
            f"of the sensitivity at each 1 − specificity (grid of {len(FPR_GRID)}) over "
            f"{n_boot} bootstrap resamples of the patients, stratified by class. The AUC in "
            "the legend is that of the averaged scores (Table I: the mean of per-seed AUCs)."
            "</figcaption></figure></div>"
        )
        cal_rows = []
        for s, st in cal.items():
            per_seed = [_brier(inp.predictions[s][k], patients) for k in inp.predictions[s]]
            cal_rows.append(
                [
                    _e(_label(s)),
                    f'<span class="brier" data-strategy="{_e(s)}" data-brier="{st["brier"]!r}">'
                    f"{st['brier']:.4f}</span>",
                    _e(", ".join(f"{b:.4f}" for b in per_seed)),
                    _e(f"{aucs[s]:.3f}"),
                    _e(" / ".join(str(c) for c in st["counts"])),
                ]
            )
        cal_body = (
            f'<div class="figs"><figure>{_img(cal_uri, "Reliability diagram", "calibration")}'
            "<figcaption>Observed fraction of positives against the mean predicted probability "
            "(scores averaged over each strategy's seeds) "
            f"in {CALIBRATION_BINS} equal-width bins (empty bins omitted); below: patients per "
            "bin.</figcaption></figure><div>"
            + _table(
                [
                    "Strategy",
                    "Brier (seed-averaged)",
                    "Brier per seed",
                    "AUC (seed-averaged)",
                    f"patients per bin (0–1, {CALIBRATION_BINS} bins)",
                ],
                cal_rows,
                raw=True,
            )
            + f'<p class="note">Brier score: mean squared error of the probability '
            f"(sklearn.metrics.brier_score_loss); lower is better. A constant prediction of the "
            f"test prevalence ({prevalence:.2f}) scores {prevalence * (1 - prevalence):.4f}.</p>"
            "</div></div>"
        )
    else:
        roc_body = cal_body = (
            '<p class="warn">The test patients are all of one class: no ROC or calibration.</p>'
        )
    sections.append(("roc", "ROC curves", roc_body))
    sections.append(("calibration", "Calibration", cal_body))

    # 4. FROC
    froc_uri = _froc_figure(by_strategy)
    if froc_uri:
        rows = []
        for s, runs in by_strategy.items():
            for split in _FROC_SPLITS:
                dets = [r.detection[split] for r in runs if r.detection and split in r.detection]
                cpm = [d["froc"]["mean_sensitivity"] for d in dets]
                cpm = [c for c in cpm if c is not None]
                if dets:
                    rows.append(
                        [
                            _label(s),
                            _FROC_SPLITS[split],
                            len(dets),
                            f"{dets[0]['n_volumes']} / {dets[0]['n_nodes']}",
                            _fmt(float(np.mean(cpm))) if cpm else "—",
                            _fmt(float(np.mean([d["dice"] for d in dets]))),
                        ]
                    )
        froc_body = (
            f'<div class="figs"><figure>{_img(froc_uri, "FROC curves", "froc")}<figcaption>'
            "Lesion-level FROC of the ROI decoder (detection.json): step curve of the first run; "
            "circles: sensitivity at 1/8…8 false positives per volume, mean over runs (a "
            "curve starting at 0 FP is drawn from 1/16).</figcaption></figure></div>"
            + _table(
                [
                    "Strategy",
                    "split",
                    "runs",
                    "volumes / nodes",
                    "mean sensitivity 1/8–8 FP (CPM)",
                    "Dice (> ζ)",
                ],
                rows,
            )
        )
    else:
        froc_body = (
            "<p>No detection.json in the run folders (only strategies that train the ROI "
            "decoder, <code>multitask</code> and <code>ssmdmt</code>, are scored as detectors)."
            "</p>"
        )
    sections.append(("froc", "FROC (lymph-node detection)", froc_body))

    # 5. per-patient predictions
    csv_text = _write_predictions_csv(folder / PREDICTIONS_FILE, patients, y, scores)
    pred_rows = [r.split(",") for r in csv_text.strip().splitlines()]
    pred_body = (
        f'<p><a href="{PREDICTIONS_FILE}">{PREDICTIONS_FILE}</a>: one row per test patient '
        f"({len(patients)}), the label and each strategy's probability averaged over its "
        "seeds.</p><details><summary>show the table</summary>"
        + _table(pred_rows[0], pred_rows[1:], "preds")
        + "</details>"
    )
    sections.append(("predictions", "Per-patient predictions", pred_body))

    # 6. overlays
    sections.append(("overlays", "Overlays", _overlay_section(inp, by_strategy)))

    # 7. training curves
    curves = []
    for s, runs in by_strategy.items():
        uri = _history_figure(s, runs)
        if uri:
            curves.append(f"<figure>{_img(uri, f'training curves {s}', 'history')}</figure>")
    sections.append(
        (
            "training",
            "Training curves",
            '<div class="figs">' + "".join(curves) + "</div>"
            if curves
            else "<p>No history.csv found.</p>",
        )
    )

    # 8. learning curves
    sections.append(("learning", "Learning curves", _learning_curves_section(by_strategy)))

    # 9. checklist
    sections.append(("checklist", "Reporting checklist", _checklist(inp, n_boot, ci)))

    title = (
        f"lymphdx comparison report: {folder.resolve().name}"
        if inp.kind == "compare"
        else f"lymphdx run report: {_label(inp.runs[0].strategy)}, {inp.runs[0].name}"
    )
    nav = " ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections)
    body = "\n".join(f'<section id="{a}"><h2>{_e(t)}</h2>\n{b}\n</section>' for a, t, b in sections)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{_e(title)}</h1><p class="note">{_e(folder.resolve())}</p><nav>{nav}</nav>\n'
        f"{body}\n{_SCRIPT}</body></html>\n"
    )
    out = folder / REPORT_FILE
    write_text(out, page)
    return out


def _learning_curves_section(by_strategy: dict[str, list[Run]]) -> str:
    """The body of the "Learning curves" section: the figure of
    :func:`lymphdx.reporting.curves.learning_curves_figure` over the runs' ``history.csv``
    and how to read it."""
    curves = read_curves({s: [r.path for r in runs] for s, runs in by_strategy.items()})
    if not curves:
        return "<p>No history.csv found.</p>"
    uri = _png(learning_curves_figure(curves))
    n = sum(len(v) for v in curves.values())
    return (
        f'<div class="figs"><figure>{_img(uri, "learning curves", "learning")}'
        '<figcaption style="max-width:1000px">'
        "How to read it: a run has learned when its validation AUC (left, weak set) and "
        "Dice (right, strong set) rise and then level off as the training steps grow; a "
        "curve still rising at the end wants more steps. "
        f"Thin lines: the {n} run(s) (seeds, folds); thick: the mean over a strategy's runs "
        "at the steps they share (a single run is drawn thick); dashed vertical line: end of "
        "the ROI warm-up; dotted line with ▼: first propagation of pseudo labels. "
        "Strategies without an ROI loss log no Dice and are left out on the right."
        "</figcaption></figure></div>"
    )


def _brier(rows: dict[str, tuple[int, float]], patients: list[str]) -> float:
    from sklearn.metrics import brier_score_loss

    return float(
        brier_score_loss(
            [rows[p][0] for p in patients], np.clip([rows[p][1] for p in patients], 0, 1)
        )
    )


def _overlay_section(inp: Inputs, by_strategy: dict[str, list[Run]]) -> str:
    res = inp.results or {}
    if res.get("strategies"):
        best = max(res["strategies"], key=lambda s: res["strategies"][s]["test_auc_mean"])
    else:
        best = inp.runs[0].strategy
    runs = [r for r in by_strategy.get(best, []) if r.predictions]
    if not runs:
        return f'<p class="warn">No run folder with predictions_test.csv for {_e(best)}.</p>'
    run = runs[0]
    preds = run.predictions or {}
    ids = sorted(preds)
    top = max(ids, key=lambda p: preds[p][1])
    wrong = max(ids, key=lambda p: abs(preds[p][0] - preds[p][1]))
    cases: dict[str, list[str]] = {}  # patient -> why it is shown
    cases.setdefault(top, []).append("highest probability")
    cases.setdefault(wrong, []).append("most wrong (largest |label − p|)")
    figs = []
    for pid, why in cases.items():
        uri, note = _overlay(run, pid)
        lab, p = preds[pid]
        what = " and ".join(why)
        caption = f"{what}: patient {pid}, label {lab}, test probability {p:.3f}. " + (
            note if uri else ""
        )
        if uri:
            figs.append(
                f"<figure>{_img(uri, f'overlay {pid}', 'overlay')}<figcaption>"
                f"{_e(caption)}</figcaption></figure>"
            )
        else:
            figs.append(f'<figure><p class="warn">{_e(caption)} {_e(note)}</p></figure>')
    from lymphdx.core.strategies import get_strategy

    try:
        decoder = get_strategy(best).trains_decoder
    except (LymphdxError, KeyError, ValueError):
        decoder = True
    untrained = (
        ""
        if decoder
        else f" {_e(_label(best))} does not train the ROI decoder, so its ROI "
        "map (and mask) is that of an untrained decoder: only the scan and the probability "
        "are meaningful here."
    )
    if inp.kind == "run":
        which = f"<p>This run ({_e(_label(best))}, {_e(run.name)}): "
    else:
        which = (
            f"<p>Best strategy by mean test AUC: <b>{_e(_label(best))}</b>; its first run "
            f"<code>{_e(run.path.relative_to(inp.folder))}</code>: "
        )
    return (
        which + "its test patient with the highest probability and the one farthest from "
        "its label. "
        "Axial slice with the highest ROI probability, ROI mask (&gt; ζ) in red, drawn by "
        f"<code>lymphdx predict</code> on the original scan.{untrained}</p>"
        f'<div class="figs">{"".join(figs)}</div>'
    )
