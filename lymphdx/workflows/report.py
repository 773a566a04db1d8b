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


Here: loading (``report_inputs``), the overlays (inference by ``lymphdx predict``) and the
page's assembly; the checklist is ``report_checklist``'s; Table I, figures and the other
sections are rendered by ``lymphdx.reporting`` (``table``, ``figures``, ``sections``).
Nothing here trains or chooses anything; the test split is only read.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import csv_text, read_csv, write_text
from lymphdx.reporting.calibration import calibration_html
from lymphdx.reporting.figures import data_uri
from lymphdx.reporting.html import escape, img, page
from lymphdx.reporting.runs import Run
from lymphdx.reporting.sections import (
    findings_table,
    froc_section,
    learning_curves_section,
    predictions_section,
    roc_and_calibration,
    run_metrics,
    training_section,
)
from lymphdx.reporting.table import label, table_one_html
from lymphdx.workflows.report_checklist import checklist
from lymphdx.workflows.report_inputs import (
    Inputs,
    evaluation_settings,
    load_inputs,
    seed_averaged,
    stale_notes,
)

log = logging.getLogger("lymphdx")

__all__ = ["write_report", "REPORT_FILE", "PREDICTIONS_FILE"]

REPORT_FILE = "report.html"
PREDICTIONS_FILE = "report_predictions.csv"


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` and ``report_predictions.csv`` into a run or compare folder;
    returns the HTML's path. Raises ``LymphdxError`` for any other folder."""
    folder = Path(path)
    inp = load_inputs(folder)
    patients, y, scores = seed_averaged(inp.predictions)
    n_boot, ci = evaluation_settings(inp.runs)
    by_strategy: dict[str, list[Run]] = {}
    for r in inp.runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    n_seeds = {s: len(v) for s, v in inp.predictions.items()}
    seed_note = ", ".join(f"{label(s)}: {k}" for s, k in n_seeds.items())

    sections: list[tuple[str, str, str]] = []  # (anchor, title, body)
    notes = stale_notes(inp)
    if notes:  # said first, and on the terminal: the numbers below are not current
        for note in notes:
            log.warning("report: %s", note)
        sections.append(
            ("stale", "Warning: results not from the runs' final models", _stale_html(notes))
        )
    if inp.kind == "compare":
        table = table_one_html(inp.results or {})
        sections.append(("table", "Table I: classification AUC", table))
    else:
        sections.append(("table", "Test metrics", run_metrics(inp.runs[0])))
    roc, calibration = roc_and_calibration(
        patients, y, scores, inp.predictions, n_boot, ci, seed_note
    )
    sections.append(("roc", "ROC curves", roc))
    # the recalibration and the operating point (results.json / metrics.json)
    recorded = (inp.results or {}).get("calibration")
    if inp.kind == "run" and (inp.runs[0].metrics or {}).get("calibration"):
        m = inp.runs[0].metrics
        recorded = {
            inp.runs[0].strategy: {
                "mode": "the run's validation split",
                "method": m["calibration"]["method"],
                "runs": {
                    inp.runs[0].name: {
                        **m["calibration"],
                        "n": m["n"],
                        "events": m["n_pos"],
                        "operating_point": m["operating_point"],
                    }
                },
            }
        }
    calibration += calibration_html(recorded)
    sections.append(("calibration", "Calibration", calibration))
    sections.append(("froc", "FROC (lymph-node detection)", froc_section(by_strategy)))
    csv_text = _write_predictions_csv(folder / PREDICTIONS_FILE, patients, y, scores)
    predictions = predictions_section(PREDICTIONS_FILE, csv_text, len(patients))
    sections.append(("predictions", "Per-patient predictions", predictions))
    sections.append(("overlays", "Overlays", _overlay_section(inp, by_strategy)))
    sections.append(("training", "Training curves", training_section(by_strategy)))
    run_dirs = {s: [r.path for r in runs] for s, runs in by_strategy.items()}
    sections.append(("learning", "Learning curves", learning_curves_section(run_dirs)))
    sections.append(("checklist", "Reporting checklist", checklist(inp, n_boot, ci)))

    title = (
        f"lymphdx comparison report: {folder.resolve().name}"
        if inp.kind == "compare"
        else f"lymphdx run report: {label(inp.runs[0].strategy)}, {inp.runs[0].name}"
    )
    out = folder / REPORT_FILE
    write_text(out, page(title, str(folder.resolve()), sections))
    return out


def _stale_html(notes: list[str]) -> str:
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (
        '<p class="warn">Some of the scores below do not come from the final '
        "<code>checkpoints/best.pt</code> of their run:</p>"
        f'<ul class="warn">{items}</ul><p>When training has finished, score them again '
        "(<code>lymphdx evaluate RUN</code>, or the same <code>lymphdx compare</code> "
        "again, which re-scores stale runs), then run <code>lymphdx report</code> again.</p>"
    )


def _write_predictions_csv(
    path: Path, patients: list[str], y: np.ndarray, scores: dict[str, np.ndarray]
) -> str:
    """Write the per-patient predictions (label, each strategy's seed-averaged
    probability); returns the file's text."""
    rows = (
        [pid, int(y[i]), *(f"{scores[s][i]:.6f}" for s in scores)] for i, pid in enumerate(patients)
    )
    text = csv_text(["patient_id", "label", *scores], rows)
    write_text(path, text)
    return text


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
        for row in read_csv(manifest):
            if row.get("patient_id") == patient_id and row.get("image"):
                path = Path(row["image"]).expanduser()
                return path if path.is_absolute() else manifest.parent / path
        raise


def _overlay(run: Run, patient_id: str) -> tuple[str | None, str, list[dict[str, Any]]]:
    """``(data URI or None, note, findings)`` of the run's overlay for one weak-set
    patient (the findings of ``lymphdx predict`` on its scan)."""
    if not (run.path / "checkpoints" / "best.pt").is_file():
        return (
            None,
            f"no overlay: the checkpoint {run.path / 'checkpoints' / 'best.pt'} is missing",
            [],
        )
    manifest = (run.config.get("manifests") or {}).get("weak")
    if not manifest:
        return None, "no overlay: config.yaml names no weak manifest", []
    manifest = Path(manifest)
    if not manifest.is_file():
        return None, f"no overlay: the weak manifest {manifest} is missing", []
    try:
        image = _image_of(manifest, patient_id)
    except LymphdxError as err:
        return None, f"no overlay: {err}", []
    if not image.exists():
        return None, f"no overlay: the image {image} is missing", []
    from lymphdx.workflows.predict import predict

    with tempfile.TemporaryDirectory(prefix="lymphdx-report-") as tmp:
        try:
            result = predict(run.path, [image], tmp)[0]
        except (LymphdxError, OSError, RuntimeError, KeyError, ValueError) as err:
            return None, f"no overlay: predicting {image} failed: {err}", []
        png = next(Path(tmp).rglob("overlay.png"), None)
        if png is None:
            return None, "no overlay: lymphdx.workflows.predict.predict wrote no overlay.png", []
        uri = data_uri(png.read_bytes())
    note = (
        f"image {image}; probability recomputed now {result['probability']:.3f}, "
        f"ROI voxels > ζ: {result['roi_voxels']}, {len(result['findings'])} node "
        f"candidate(s), slice through the most probable node {result['overlay_slice']}"
    )
    return uri, note, result["findings"]


def _overlay_section(inp: Inputs, by_strategy: dict[str, list[Run]]) -> str:
    res = inp.results or {}
    if res.get("strategies"):
        best = max(res["strategies"], key=lambda s: res["strategies"][s]["test_auc_mean"])
    else:
        best = inp.runs[0].strategy
    runs = [r for r in by_strategy.get(best, []) if r.predictions]
    if not runs:
        return f'<p class="warn">No run folder with predictions_test.csv for {escape(best)}.</p>'
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
        uri, note, findings = _overlay(run, pid)
        lab, p = preds[pid]
        what = " and ".join(why)
        caption = f"{what}: patient {pid}, label {lab}, test probability {p:.3f}. " + (
            note if uri else ""
        )
        if uri:
            figs.append(
                f"<figure>{img(uri, f'overlay {pid}', 'overlay')}<figcaption>"
                f"{escape(caption)}</figcaption>{findings_table(findings, pid)}</figure>"
            )
        else:
            figs.append(f'<figure><p class="warn">{escape(caption)} {escape(note)}</p></figure>')
    from lymphdx.core.strategies import get_strategy

    try:
        decoder = get_strategy(best).trains_decoder
    except (LymphdxError, KeyError, ValueError):
        decoder = True
    untrained = (
        ""
        if decoder
        else f" {escape(label(best))} does not train the ROI decoder, so its ROI "
        "map (and mask) is that of an untrained decoder: only the scan and the probability "
        "are meaningful here."
    )
    if inp.kind == "run":
        which = f"<p>This run ({escape(label(best))}, {escape(run.name)}): "
    else:
        which = (
            f"<p>Best strategy by mean test AUC: <b>{escape(label(best))}</b>; its first run "
            f"<code>{escape(run.path.relative_to(inp.folder))}</code>: "
        )
    return (
        which + "its test patient with the highest probability and the one farthest from "
        "its label. "
        "Axial slices through the most probable node and through the middle, ROI "
        "probability in colour, ROI mask (&gt; ζ) as a red contour, drawn by "
        "<code>lymphdx predict</code> on the original scan, with its node findings "
        f"(<code>findings.csv</code>: RECIST axes in the axial plane, LPS mm).{untrained}</p>"
        f'<div class="figs">{"".join(figs)}</div>'
    )
