"""``predict``: run a trained model on scans and write results a radiologist can open.

Per scan, into ``OUT/<name>/``:
    prediction.json   probability of metastatic lymph nodes (calibrated), label, thresholds
    roi_prob.nii.gz   ROI probability map g(f(v)) on the scan's own grid (float32)
    roi_mask.nii.gz   ROI mask, probability > ζ (``roi_threshold``), same grid (uint8)
    findings.csv      one row per node candidate (connected component of the mask):
                      centre (LPS mm), voxel index, box, volume, RECIST long and short
                      axes, max and mean ROI probability (``findings``); also in
                      prediction.json
    findings.mrk.json the candidates' centres as a 3D Slicer point list
    roi_seg.dcm       for a DICOM series: the mask as a DICOM SEG referencing it
                      (``io.dicom_seg``; why not, in ``dicom_seg_warning``)
    overlay.png       the axial slice through the most probable node and the central one:
                      ROI probability with its colour bar, the mask's contour, R/L and
                      A/P at the edges (Fig. 2)
The outputs carry the input's spacing, origin and direction, so they overlay the scan in
3D Slicer or ITK-SNAP.

Several runs scoring each scan together (a fold ensemble, ``workflows.ensemble``) write
the same files through ``predict_scans`` and ``write_scan``.

``OUT/summary.csv`` has one row per scan (``SUMMARY_COLUMNS``): its probability, label,
number of node candidates and largest short axis, or why it failed, and the warnings
logged while it was predicted (``warnings``, joined by `` | ``). A scan that fails
(a bad file) is reported there and in the error raised at the end; it stops neither the
other scans nor leaves a half-written folder. ``scan_inputs`` turns folders of scans and
manifests into the list of scans.

Each scan's folder is written beside it under a temporary name and renamed over the old
one, so it is complete or absent. ``OUT`` holds one run's outputs: the folders of an
earlier ``predict`` into it (recognised by their files) that this run does not write are
removed at its end, also when it stops on a bad scan.

``probability`` is calibrated with the run's ``calibration.json`` (fitted by ``evaluate``
on the validation patients; ``probability_uncalibrated`` beside it,
``probability_calibration`` says how, on how many patients, and warns when they are too
few) and ``label`` is ``probability >= threshold``, the threshold of the run's operating
point (``operating_point``: what it was chosen for). A run without ``calibration.json``
(evaluated by an older lymphdx) keeps its uncalibrated probability and
``evaluation.threshold``, with a note.

With ``evaluation.roi_readout`` the uncalibrated probability is the mean of the classifier's
(``classifier_probability``) and the run's ROI readout (``engine.roi_readout``;
``roi_readout`` says which, or why none). ``prediction.json`` also records what may make
the probability mean little:
``coverage`` (the share of the model's input the scan fills) with ``coverage_warning``
(a scan far smaller than the model's field of view, e.g. a few slices; else null), and
``hu_scale`` and ``hu_offset`` (the map ``HU = hu_scale * value + hu_offset`` applied,
``lymphdx.data.calibration``) with ``calibration_warning`` (raw CT numbers corrected by
-1024, another storage map corrected, or intensities whose map cannot be told, used as
they are; else null). Both warnings are also logged and in ``summary.csv``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lymphdx.core.config import Config
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import (
    atomic_dir,
    atomic_path,
    ensure_writable_dir,
    path_problem,
    write_csv,
    write_json,
)
from lymphdx.core.zeta import roi_mask
from lymphdx.data.manifest import read_rows, resolve_path
from lymphdx.data.scan_prep import PreparedScan
from lymphdx.engine.run_state import refuse_while_busy
from lymphdx.io import volumes as io
from lymphdx.io.dicom_seg import write_dicom_seg
from lymphdx.io.geometry import Volume
from lymphdx.workflows.findings import find_nodes, findings_json, slicer_markups, write_findings
from lymphdx.workflows.run_scorer import RunScorer

__all__ = [
    "SUMMARY_COLUMNS",
    "edge_labels",
    "output_name",
    "predict",
    "predict_scans",
    "save_overlay",
    "scan_fields",
    "scan_inputs",
    "threshold_fields",
    "write_scan",
]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: What a scan's output folder holds (how an earlier run's folders are recognised).
OUTPUT_FILES = frozenset(
    {
        "prediction.json",
        "roi_prob.nii.gz",
        "roi_mask.nii.gz",
        "findings.csv",
        "findings.mrk.json",
        "roi_seg.dcm",
        "overlay.png",
    }
)

SUMMARY_COLUMNS = (
    "image",
    "patient_id",
    "output",
    "status",
    "probability",
    "label",
    "threshold",
    "nodes",
    "largest_short_axis_mm",
    "error",
    "warnings",
)

log = logging.getLogger("lymphdx")


def scan_inputs(paths: list[Path], manifest: Path | None = None) -> list[tuple[Path, str | None]]:
    """The scans to predict, ``(path, patient id or None)`` each, in order: every file of
    ``paths``; a folder that holds a DICOM series as one scan; any other folder as its
    volume files and DICOM series subfolders (sorted by name); then the ``image`` column
    of ``manifest`` (a CSV with ``patient_id`` and ``image``, paths relative to it)."""
    scans: list[tuple[Path, str | None]] = []
    for path in map(Path, paths):
        if not path.is_dir() or io.dicom_series_ids(path):
            scans.append((path, None))
            continue
        found = [
            entry
            for entry in sorted(path.iterdir())
            # a broken link named like a scan is listed, so that it is reported, not skipped
            if (not entry.is_dir() and entry.name.lower().endswith(_SUFFIXES[:-1]))
            or (entry.is_dir() and io.dicom_series_ids(entry))
        ]
        if not found:
            raise InputError(
                "folder holds no scans (NIfTI, NRRD or MetaImage files, or DICOM series folders)",
                path,
            )
        scans.extend((entry, None) for entry in found)
    if manifest is not None:
        _, rows = read_rows(Path(manifest), ("patient_id", "image"), "predict manifest")
        for row in rows:
            image = resolve_path(row.cells["image"], Path(manifest).parent)
            scans.append((image, row.cells["patient_id"] or None))
    return scans


def output_name(path: Path) -> str:
    """Folder name for a scan's outputs: file name without its volume extension."""
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scan"


_WORLD_LETTERS = (("R", "L"), ("A", "P"), ("I", "S"))  # LPS: (−, +) end of each axis


def edge_labels(direction: tuple[float, ...]) -> dict[str, str]:
    """Which patient side lies at each edge of an axial array slice ``(y, x)`` shown with
    row 0 at the top: ``{"left", "right", "top", "bottom"}`` → ``R``/``L``, ``A``/``P`` or
    ``I``/``S``, from the world axis (LPS) nearest each index axis's direction."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    out = {}
    for column, (low, high) in ((0, ("left", "right")), (1, ("top", "bottom"))):
        axis = int(np.argmax(np.abs(d[:, column])))
        minus, plus = _WORLD_LETTERS[axis]
        towards_plus = d[axis, column] > 0  # index increases towards the + end (L, P, S)
        out[low], out[high] = (minus, plus) if towards_plus else (plus, minus)
    return out


def save_overlay(
    path: Path,
    hu_zyx: np.ndarray,
    prob_zyx: np.ndarray,
    mask_zyx: np.ndarray,
    geometry: Any,
    title: str,
    node_slice: int | None = None,
    window: tuple[float, float] = (-160, 240),
) -> list[int]:
    """Write two axial slices: the one through the most probable node (``node_slice``;
    default the slice with the highest ROI probability) and the central one. The ROI
    probability is a colour map with its colour bar (hidden below 0.05), the mask a red
    contour, and the patient's sides are marked at the edges. Returns the two slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if node_slice is None:
        node_slice = int(np.unravel_index(np.argmax(prob_zyx), prob_zyx.shape)[0])
    slices = [int(node_slice), hu_zyx.shape[0] // 2]
    sx, sy = geometry.spacing[0], geometry.spacing[1]
    sides = edge_labels(geometry.direction)
    height = 4.6 * hu_zyx.shape[1] * sy / (hu_zyx.shape[2] * sx)
    fig, axes = plt.subplots(1, 2, figsize=(10.0, height + 0.9))
    shown = None
    for ax, z, what in zip(axes, slices, ("most probable node", "central slice"), strict=True):
        ax.imshow(hu_zyx[z], cmap="gray", vmin=window[0], vmax=window[1], aspect=sy / sx)
        prob = np.ma.masked_less(prob_zyx[z], 0.05)
        shown = ax.imshow(prob, cmap="autumn_r", vmin=0, vmax=1, alpha=0.5, aspect=sy / sx)
        if mask_zyx[z].any():
            ax.contour(mask_zyx[z] > 0, levels=[0.5], colors="red", linewidths=1.2)
        for edge, (x, y, ha, va) in {
            "left": (0.01, 0.5, "left", "center"),
            "right": (0.99, 0.5, "right", "center"),
            "top": (0.5, 0.99, "center", "top"),
            "bottom": (0.5, 0.01, "center", "bottom"),
        }.items():
            ax.text(
                x,
                y,
                sides[edge],
                transform=ax.transAxes,
                ha=ha,
                va=va,
                color="white",
                fontsize=11,
                fontweight="bold",
            )
        ax.set_title(f"{what}: slice {z}, ROI probability max {prob_zyx[z].max():.2f}", fontsize=9)
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.02, label="ROI probability")
    fig.suptitle(f"{title}\nred contour: ROI mask (p > ζ)", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return slices


@torch.no_grad()
def predict(
    run_dir: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    domain: str = "weak",
    which: str = "best",
    patients: list[str | None] | None = None,
    progress: bool = False,
    series_uid: str | None = None,
) -> list[dict[str, Any]]:
    """Predict every scan in ``images`` with the run's ``which`` checkpoint; returns the
    results of the scans that succeeded and writes ``OUT/summary.csv``.

    ``domain`` picks the z-score of the hospital the scans come from (``weak``: the
    weakly-labelled set's hospital, the one the classifier is for) and, for a model with
    domain-specific batch norm (``model.norm: domain_batch``), that hospital's statistics.
    ``patients``: each scan's patient id (named in errors and the summary). ``progress``:
    a progress bar on stderr. ``series_uid``: the series to read from DICOM folders that
    hold several (each DICOM folder must hold it). Raises ``LymphdxError`` at the end
    when any scan failed.
    """
    refuse_while_busy(run_dir, "predict with it")  # its best.pt may still change
    scorer = RunScorer.load(run_dir, domain, which)
    scorer.warn_calibration()
    config = scorer.config
    common = {
        "model": str(Path(run_dir).resolve()),
        "checkpoint": scorer.state["source"],  # which weights: file, sha256, epoch
        "strategy": config.strategy,
        **threshold_fields(config, scorer.calibration, scorer.calibration_note),
        "roi_threshold": config.propagation.roi_threshold,
        "tta_flip": bool(config.evaluation.tta_flip),
        "inferer": scorer.inferer.name,
        "roi_readout": scorer.readout_note,
    }

    def one(image_path: Path, folder: Path, patient: str | None) -> dict[str, Any]:
        scan = scorer.prepare(image_path, patient, series_uid)
        scored = scorer.score(scan)
        result = {
            "image": str(image_path),
            "probability": scored.probability,
            "label": int(scored.probability >= common["threshold"]),
            **scan_fields(scored.uncalibrated, scored.classifier, common, scan),
        }
        prob_zyx = scan.to_original(scored.roi)
        return write_scan(folder, scan, prob_zyx, result, image_path, patient, series_uid)

    return predict_scans(one, images, out_dir, patients, progress)


def scan_fields(
    uncalibrated: float, classifier: float, common: dict[str, Any], scan: PreparedScan
) -> dict[str, Any]:
    """``prediction.json``'s fields after ``probability`` and ``label``: the threshold
    and the model's settings (``common``), and what the scan's preparation noted."""
    scale, offset = scan.hu_map
    return {
        "threshold": common["threshold"],
        "operating_point": common["operating_point"],
        "probability_uncalibrated": uncalibrated,
        "probability_calibration": common["probability_calibration"],
        "roi_threshold": common["roi_threshold"],
        "tta_flip": common["tta_flip"],
        "inferer": common["inferer"],
        "classifier_probability": classifier,
        "roi_readout": common["roi_readout"],
        "model": common["model"],
        "checkpoint": common["checkpoint"],
        "strategy": common["strategy"],
        "coverage": round(scan.coverage, 6),
        "coverage_warning": scan.coverage_note,
        "hu_scale": scale,
        "hu_offset": offset,
        "calibration_warning": scan.calibration_note,
    }


def predict_scans(
    one: Callable[[Path, Path, str | None], dict[str, Any]],
    images: list[str | Path],
    out_dir: str | Path,
    patients: list[str | None] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """``one(image, folder, patient)`` for every scan (writing ``folder``, complete or not
    at all, and returning the scan's result), the failures reported and the others gone
    on with; ``OUT/summary.csv``; earlier outputs in ``OUT`` this call did not write
    removed. Raises ``LymphdxError`` at the end when any scan failed."""
    patients = list(patients) if patients is not None else [None] * len(images)
    for image_path, patient in zip(map(Path, images), patients, strict=True):
        problem = path_problem(image_path)  # before any work: a typo fails at once
        if problem is not None:
            raise InputError(problem, image_path, patient)
    out_dir = ensure_writable_dir(out_dir)
    previous = _previous_outputs(out_dir)
    written: set[str] = set()
    results: list[dict[str, Any]] = []
    summary: list[list[Any]] = []
    failed: list[LymphdxError] = []
    scans = list(zip(map(Path, images), _output_names(images), patients, strict=True))
    try:
        for image_path, name, patient in tqdm(
            scans, desc="predict", unit="scan", disable=None if progress else True
        ):
            try:
                with _warnings_of_scan() as warned:
                    result = one(image_path, out_dir / name, patient)
            except LymphdxError as err:  # a bad scan: reported, the others go on
                log.error("%s", err)
                failed.append(err)
                row = [image_path, patient, "", "failed", "", "", "", "", "", str(err)]
                summary.append([*row, " | ".join(warned)])
                continue
            results.append(result)
            written.add(name)
            short = [f["short_axis_mm"] for f in result["findings"]]
            summary.append(
                [
                    image_path,
                    patient,
                    name,
                    "ok",
                    round(result["probability"], 6),
                    result["label"],
                    round(result["threshold"], 6),
                    len(short),
                    max(short, default=""),
                    "",
                    " | ".join(warned),
                ]
            )
    finally:  # also when stopped: OUT holds this run's complete outputs only
        _remove_previous(out_dir, previous - written)
        write_csv(out_dir / "summary.csv", SUMMARY_COLUMNS, summary)
    if failed:
        raise LymphdxError(
            f"{len(failed)} of {len(scans)} scans failed, the others are written "
            f"(summary: {out_dir / 'summary.csv'}): "
            + "; ".join(map(str, failed[:5]))
            + ("; ..." if len(failed) > 5 else "")
        )
    return results


@contextlib.contextmanager
def _warnings_of_scan() -> Iterator[list[str]]:
    """Collect the warnings logged while one scan is predicted (calibration, coverage,
    DICOM reading, DICOM SEG, ...) for its row of ``summary.csv``. A filter, not a
    handler: the warnings still reach the terminal (and any handler) as before."""
    found: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            found.append(record.getMessage())
        return True

    log.addFilter(keep)
    try:
        yield found
    finally:
        log.removeFilter(keep)


def _output_names(images: list[str | Path]) -> list[str]:
    """Each scan's output folder name (``output_name``; ``_2``, ``_3`` … on a clash)."""
    names: list[str] = []
    for image_path in map(Path, images):
        name = base = output_name(image_path)
        k = 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def _previous_outputs(out_dir: Path) -> set[str]:
    """The scan folders in ``out_dir`` that an earlier ``predict`` wrote: those holding a
    ``prediction.json`` and nothing but ``OUTPUT_FILES`` (anything else is left alone)."""
    found = set()
    for folder in out_dir.iterdir():
        try:
            if folder.name.startswith(".") or folder.is_symlink() or not folder.is_dir():
                continue
            names = {p.name for p in folder.iterdir()}
        except OSError:  # a folder that cannot be listed is not ours to remove
            continue
        if "prediction.json" in names and names <= OUTPUT_FILES:
            found.add(folder.name)
    return found


def _remove_previous(out_dir: Path, names: set[str]) -> None:
    """Remove an earlier run's scan folders that this run did not write (each renamed
    away first, so none is left half-deleted under its name)."""
    for name in sorted(names):
        old = out_dir / f".old-{uuid.uuid4().hex[:8]}-{name}"
        try:
            os.replace(out_dir / name, old)
        except OSError:
            continue
        shutil.rmtree(old, ignore_errors=True)
    if names:
        log.warning(
            "removed the outputs of an earlier predict in %s for scans not predicted now: %s",
            out_dir,
            ", ".join(sorted(names)),
        )


def threshold_fields(
    config: Config, calibration: dict[str, Any] | None, note: str | None
) -> dict[str, Any]:
    """``prediction.json``'s ``threshold``, ``operating_point`` and
    ``probability_calibration``: from the run's ``calibration.json`` (``calibration``), or
    for a run without one ``evaluation.threshold`` on the uncalibrated probability, with
    ``note`` saying why."""
    if calibration is None:
        threshold = config.evaluation.threshold
        return {
            "threshold": threshold,
            "operating_point": {"target": "evaluation.threshold", "value": threshold, "note": note},
            "probability_calibration": {"method": "none", "note": note},
        }
    op = calibration["operating_point"]
    return {
        "threshold": op["threshold"],
        "operating_point": {
            "target": op["target"],
            "value": op["value"],
            "chosen_on": calibration["fitted_on"]["patients"],
            # the rates it had on those patients (the test patients': metrics.json)
            "sensitivity_there": op["sensitivity"],
            "specificity_there": op["specificity"],
            "note": op.get("note"),
        },
        "probability_calibration": {
            "method": calibration["method"],
            "requested": calibration["requested"],
            "fitted_on": calibration["fitted_on"],
            "warning": calibration["warning"],
            "note": calibration["note"],
        },
    }


def write_scan(
    folder: Path,
    scan: PreparedScan,
    prob_zyx: np.ndarray,
    result: dict[str, Any],
    image_path: Path,
    patient: str | None = None,
    series_uid: str | None = None,
) -> dict[str, Any]:
    """Write one scan's outputs (``_write_outputs``; ``prob_zyx`` on the scan's own grid)
    to ``folder``, complete or not at all; returns its result."""
    series = image_path if image_path.is_dir() else None  # a DICOM series: also a SEG
    with atomic_dir(folder) as tmp:  # written beside, then renamed over the old folder
        return _write_outputs(
            tmp,
            folder.name,
            scan.source,
            prob_zyx,
            result["roi_threshold"],
            result,
            series,
            patient,
            series_uid,
        )


def _write_outputs(
    folder: Path,
    name: str,
    volume: Volume,
    prob_zyx: np.ndarray,
    zeta: float,
    result: dict[str, Any],
    series: Path | None = None,
    patient: str | None = None,
    series_uid: str | None = None,
) -> dict[str, Any]:
    """Write one scan's ROI maps, findings, overlay and ``prediction.json`` into ``folder``,
    and for a DICOM ``series`` folder the mask as a DICOM SEG (over ``series_uid``, when
    the folder holds several).

    ``result`` holds the probability and the thresholds; the ROI summary is added to it.
    """
    mask_zyx = roi_mask(prob_zyx, zeta).astype(np.uint8)
    if series is not None:
        note = write_dicom_seg(folder / "roi_seg.dcm", mask_zyx, series, patient, series_uid)
        if note is not None:
            log.warning("%s: %s", series, note)
        result = {**result, "dicom_seg": None if note else "roi_seg.dcm", "dicom_seg_warning": note}
    io.write_volume(folder / "roi_prob.nii.gz", prob_zyx, volume.geometry)
    io.write_volume(folder / "roi_mask.nii.gz", mask_zyx, volume.geometry)
    nodes = find_nodes(prob_zyx, zeta, volume.geometry)
    write_findings(folder / "findings.csv", nodes)
    write_json(folder / "findings.mrk.json", slicer_markups(nodes, name))
    verdict = "positive" if result["label"] else "negative"
    node_slice, central_slice = save_overlay(
        folder / "overlay.png",
        volume.array,
        prob_zyx,
        mask_zyx,
        volume.geometry,
        f"{name}: P(metastatic) = {result['probability']:.3f} -> {verdict}",
        node_slice=nodes[0].index_k if nodes else None,
    )
    result = {
        **result,
        "roi_max_probability": float(prob_zyx.max()),
        "roi_voxels": int(mask_zyx.sum()),
        "overlay_slice": node_slice,
        "overlay_central_slice": central_slice,
        **findings_json(nodes, zeta),
    }
    write_json(folder / "prediction.json", result)
    return result
