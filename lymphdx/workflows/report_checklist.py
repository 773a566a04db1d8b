"""The report's reporting checklist: the items a CLAIM / TRIPOD+AI reviewer asks for
(data sources, patients per set and split, how the split was made, seeds, sample sizes,
model selection, preprocessing, model, training, evaluation, software, dates), gathered
from the run folders, their ``splits.csv``, the weak manifest and the checkpoint."""

from __future__ import annotations

import csv
import datetime as _dt
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import read_csv
from lymphdx.reporting.figures import CALIBRATION_BINS
from lymphdx.reporting.html import escape, fmt, kv, table
from lymphdx.reporting.runs import Run
from lymphdx.stats.roc import BOOTSTRAP_SEED
from lymphdx.workflows.report_inputs import Inputs

__all__ = ["checklist"]


def _splits_summary(runs: list[Run], folder: Path) -> tuple[str, dict[str, Any]]:
    """Counts per set × split (weak positives) from the runs' splits.csv."""
    info: dict[str, Any] = {}
    tables = {}
    for r in runs:
        rows = read_csv(r.path / "splits.csv")
        if rows:
            key = tuple(sorted((x["set"], x["patient_id"], x["split"]) for x in rows))
            tables.setdefault(key, (r, rows))
    if not tables and (folder / "splits.csv").is_file():
        tables[()] = (None, read_csv(folder / "splits.csv"))
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
    return "<br>".join(escape(x) for x in lines), info


def _versions() -> str:
    """The versions of lymphdx, its main dependencies and Python."""
    out = []
    for pkg in ("lymphdx", "torch", "monai", "numpy", "scikit-learn", "SimpleITK", "matplotlib"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} (not installed)")
    out.append(f"Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    return ", ".join(out)


def _mtime(path: Path) -> str:
    """When ``path`` was last written, local time with offset."""
    return (
        _dt.datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    )


def checklist(inp: Inputs, n_boot: int, ci: float) -> str:
    """The checklist table of a loaded folder; ``n_boot`` and ``ci``: the report's
    bootstrap settings."""
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
        k: v["design"]["n_for_80_power"]
        for k, v in res.get("paired_tests", {}).items()
        if (v.get("design") or {}).get("n_for_80_power") is not None
    }
    if needed:
        effect = (res.get("claim_rule") or {}).get("declared_effect")
        sizes += (
            f"; test patients needed for 80% power of the paired DeLong test at the declared "
            f"ΔAUC of {effect:g}: " + ", ".join(f"{k}: {v}" for k, v in needed.items())
        )
    chosen: dict[str, list[str]] = {}
    for r in runs:
        if r.metrics and "best_epoch" in r.metrics:
            chosen.setdefault(r.strategy, []).append(
                f"{r.metrics['best_epoch']} ({fmt(r.metrics.get('best_val_auc'), 2)})"
            )
    best = "; ".join(f"{s}: {', '.join(v)}" for s, v in chosen.items())
    ev = cfg.get("evaluation") or {}
    selection = (
        "Checkpoint with the best validation AUC on the weak set's val split (ties: lower "
        "validation loss), saved as checkpoints/best.pt; the test split is scored once per run "
        "after training and never used for any choice (epoch, strategy, threshold). Selected "
        f"epochs (validation AUC), run by run: {best or '—'}. Probabilities recalibrated "
        f"({ev.get('calibration', 'platt')}) and the decision threshold chosen "
        f"({ev.get('operating_point', 'youden')}) on the validation patients (under "
        "cross-validation: on the other folds)."
    )
    prep = dict(data)
    prep.pop("split", None)
    prep.pop("split_seed", None)
    pre_html = (
        kv(prep)
        + "<br>"
        + escape(
            "intensity: clipped to hu_window, then z-score per domain (hospital) from each set's "
            "training split (normalization.json); resampled once onto a canonical grid with "
            "identity direction"
        )
    )
    training = dict(cfg.get("training") or {})
    train_html = kv(training) + "<br>" + kv({"propagation": cfg.get("propagation")})
    params = _parameter_count(first) if first else None
    model_html = kv(cfg.get("model")) + (
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
            escape(
                f"label (weak) set manifest: {manifests.get('weak')}; ROI (strong) set manifest: "
                f"{manifests.get('strong')} (two sources, each labelled for one task)"
            ),
        ],
        ["Patients per set and split", split_html],
        [
            "Split level and how it was made",
            escape("patient-wise (one manifest row per patient, one split per patient); " + how)
            + "<br>"
            + escape(checks),
        ],
        [
            "Seeds",
            escape(
                f"training seeds {seeds_train}; split seed {data.get('split_seed')}; "
                f"report bootstrap seed {BOOTSTRAP_SEED}"
            ),
        ],
        ["Sample sizes", escape(sizes)],
        ["Model selection", escape(selection)],
        ["Preprocessing", pre_html],
        ["Model", model_html],
        ["Training", train_html],
        ["Evaluation", escape(evaluation)],
        ["Software", escape(_versions())],
        ["Date", escape(dates)],
    ]
    return table(["Item (CLAIM / TRIPOD+AI)", "This study"], rows, "kv checklist", raw=True)


def _parameter_count(run: Run) -> int | None:
    """Trainable parameters in the run's ``best.pt``; None without a readable one."""
    path = run.path / "checkpoints" / "best.pt"
    if not path.is_file():
        return None
    try:
        from lymphdx.engine.run_folder import load_checkpoint

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
