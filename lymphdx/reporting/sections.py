"""Sections of the report page that format what they are given: a run's test metrics,
ROC and calibration, FROC, the per-patient predictions, training curves and learning
curves. Each returns the HTML body of its section (figures inline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.reporting.curves import learning_curves_figure, read_curves
from lymphdx.reporting.figures import (
    CALIBRATION_BINS,
    FROC_SPLITS,
    calibration_figure,
    froc_figure,
    history_figure,
    png_uri,
    roc_figure,
)
from lymphdx.reporting.html import escape, fmt, img, interval, table
from lymphdx.reporting.runs import Run
from lymphdx.reporting.table import label
from lymphdx.stats.roc import FPR_GRID

__all__ = [
    "run_metrics",
    "roc_and_calibration",
    "froc_section",
    "predictions_section",
    "training_section",
    "learning_curves_section",
    "findings_table",
]


def run_metrics(run: Run) -> str:
    """A single run's test metrics (``metrics.json``) as a two-column table."""
    m = run.metrics or {}
    if not m:
        return '<p class="warn">No metrics.json (run <code>lymphdx evaluate</code>).</p>'
    rows = [
        ["strategy", label(run.strategy)],
        ["seed", m.get("seed", run.seed)],
        ["split", m.get("split")],
        ["patients (positive)", f"{m.get('n')} ({m.get('n_pos')})"],
        ["AUC", fmt(m.get("auc"))],
        ["95% CI (stratified bootstrap)", interval(m.get("auc_ci95"))],
        ["SE (DeLong)", fmt(m.get("auc_se_delong"))],
        ["threshold", fmt(m.get("threshold"), 2)],
        [
            "sensitivity / specificity",
            f"{fmt(m.get('sensitivity'))} / {fmt(m.get('specificity'))}",
        ],
        ["accuracy", fmt(m.get("accuracy"))],
        ["selected epoch (val AUC)", f"{m.get('best_epoch')} ({fmt(m.get('best_val_auc'))})"],
    ]
    for k in sorted(m):
        if k.endswith("_dice") or k.endswith("_froc_mean_sensitivity"):
            rows.append([k.replace("_", " "), fmt(m[k])])
    return table(["metric", "value"], rows, "kv")


def _brier(rows: dict[str, tuple[int, float]], patients: list[str]) -> float:
    """Brier score of ``{patient: (label, probability)}`` over ``patients``."""
    from sklearn.metrics import brier_score_loss

    return float(
        brier_score_loss(
            [rows[p][0] for p in patients], np.clip([rows[p][1] for p in patients], 0, 1)
        )
    )


def roc_and_calibration(
    patients: list[str],
    y: np.ndarray,
    scores: dict[str, np.ndarray],
    predictions: dict[str, dict[str, dict[str, tuple[int, float]]]],
    n_boot: int,
    ci: float,
    seed_note: str,
) -> tuple[str, str]:
    """The bodies of the ROC and the calibration sections, from the seed-averaged
    ``scores`` of ``patients`` (labels ``y``) and the per-seed ``predictions``."""
    if not 0 < y.sum() < len(y):
        body = '<p class="warn">The test patients are all of one class: no ROC or calibration.</p>'
        return body, body
    averaged = any(len(v) > 1 for v in predictions.values())
    what = "seed-averaged scores" if averaged else "test split"
    roc_uri, aucs = roc_figure(y, scores, n_boot, ci, what)
    cal_uri, cal = calibration_figure(y, scores)
    prevalence = float(y.mean())
    roc_body = (
        f'<div class="figs"><figure>{img(roc_uri, "ROC curves", "roc")}<figcaption>'
        f"Scores averaged over seeds ({escape(seed_note)} per strategy) on {len(y)} test "
        f"patients ({int(y.sum())} positive). Bands: pointwise {ci:.0%} percentile interval "
        f"of the sensitivity at each 1 − specificity (grid of {len(FPR_GRID)}) over "
        f"{n_boot} bootstrap resamples of the patients, stratified by class. The AUC in "
        "the legend is that of the averaged scores (Table I: the mean of per-seed AUCs)."
        "</figcaption></figure></div>"
    )
    cal_rows = []
    for s, st in cal.items():
        per_seed = [_brier(predictions[s][k], patients) for k in predictions[s]]
        cal_rows.append(
            [
                escape(label(s)),
                f'<span class="brier" data-strategy="{escape(s)}" data-brier="{st["brier"]!r}">'
                f"{st['brier']:.4f}</span>",
                escape(", ".join(f"{b:.4f}" for b in per_seed)),
                escape(f"{aucs[s]:.3f}"),
                escape(" / ".join(str(c) for c in st["counts"])),
            ]
        )
    cal_body = (
        f'<div class="figs"><figure>{img(cal_uri, "Reliability diagram", "calibration")}'
        "<figcaption>Observed fraction of positives against the mean predicted probability "
        "(scores averaged over each strategy's seeds) "
        f"in {CALIBRATION_BINS} equal-width bins (empty bins omitted); below: patients per "
        "bin.</figcaption></figure><div>"
        + table(
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
    return roc_body, cal_body


def froc_section(by_strategy: dict[str, list[Run]]) -> str:
    """FROC figure and table of the runs' ``detection.json``, or why there is none."""
    froc_uri = froc_figure(by_strategy)
    if not froc_uri:
        return (
            "<p>No detection.json in the run folders (only strategies that train the ROI "
            "decoder, <code>multitask</code> and <code>ssmdmt</code>, are scored as detectors)."
            "</p>"
        )
    rows = []
    for s, runs in by_strategy.items():
        for split in FROC_SPLITS:
            dets = [r.detection[split] for r in runs if r.detection and split in r.detection]
            cpm = [d["froc"]["mean_sensitivity"] for d in dets]
            cpm = [c for c in cpm if c is not None]
            if dets:
                rows.append(
                    [
                        label(s),
                        FROC_SPLITS[split],
                        len(dets),
                        f"{dets[0]['n_volumes']} / {dets[0]['n_nodes']}",
                        fmt(float(np.mean(cpm))) if cpm else "—",
                        fmt(float(np.mean([d["dice"] for d in dets]))),
                    ]
                )
    return (
        f'<div class="figs"><figure>{img(froc_uri, "FROC curves", "froc")}<figcaption>'
        "Lesion-level FROC of the ROI decoder (detection.json): step curve of the first run; "
        "circles: sensitivity at 1/8…8 false positives per volume, mean over runs (a "
        "curve starting at 0 FP is drawn from 1/16).</figcaption></figure></div>"
        + table(
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


def predictions_section(csv_name: str, csv_text: str, n_patients: int) -> str:
    """A link to the per-patient predictions file ``csv_name`` (``n_patients`` rows) and
    its ``csv_text`` as a folded table."""
    rows = [r.split(",") for r in csv_text.strip().splitlines()]
    return (
        f'<p><a href="{csv_name}">{csv_name}</a>: one row per test patient '
        f"({n_patients}), the label and each strategy's probability averaged over its "
        "seeds.</p><details><summary>show the table</summary>"
        + table(rows[0], rows[1:], "preds")
        + "</details>"
    )


def training_section(by_strategy: dict[str, list[Run]]) -> str:
    """One ``history_figure`` per strategy, or why there is none."""
    curves = []
    for s, runs in by_strategy.items():
        uri = history_figure(s, runs)
        if uri:
            curves.append(f"<figure>{img(uri, f'training curves {s}', 'history')}</figure>")
    if not curves:
        return "<p>No history.csv found.</p>"
    return '<div class="figs">' + "".join(curves) + "</div>"


def learning_curves_section(run_dirs: dict[str, list[Path]]) -> str:
    """The body of the "Learning curves" section: the figure of
    :func:`lymphdx.reporting.curves.learning_curves_figure` over the runs' ``history.csv``
    (strategy -> run folders) and how to read it."""
    curves = read_curves(run_dirs)
    if not curves:
        return "<p>No history.csv found.</p>"
    uri = png_uri(learning_curves_figure(curves))
    n = sum(len(v) for v in curves.values())
    return (
        f'<div class="figs"><figure>{img(uri, "learning curves", "learning")}'
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


def findings_table(findings: list[dict[str, Any]], patient_id: str) -> str:
    """The node findings of one scan (``prediction.json``'s ``findings``) as an HTML table
    with ``id="findings-<patient>"``."""
    rows = [
        [
            f["node"],
            f"{f['max_probability']:.3f}",
            f"{f['short_axis_mm']:.1f}",
            f"{f['long_axis_mm']:.1f}",
            f"{f['volume_mm3']:.0f}",
            ", ".join(f"{f[f'centre_lps_{a}_mm']:.1f}" for a in "xyz"),
            f"{f['index_i']}, {f['index_j']}, {f['index_k']}",
        ]
        for f in findings
    ]
    header = [
        "node",
        "max p",
        "short axis (mm)",
        "long axis (mm)",
        "volume (mm³)",
        "centre LPS (mm)",
        "voxel (i, j, k)",
    ]
    body = (
        table(header, rows, cls="findings") if rows else "<p>No node candidate (no voxel > ζ).</p>"
    )
    return f'<div class="findings" id="findings-{escape(patient_id)}">{body}</div>'
