"""``predict``: run a trained model on scans and write results a radiologist can open.

Per scan, into ``OUT/<name>/``:
    prediction.json   probability of metastatic lymph nodes, label, thresholds
    roi_prob.nii.gz   ROI probability map g(f(v)) on the scan's own grid (float32)
    roi_mask.nii.gz   ROI mask, probability > ζ (``roi_threshold``), same grid (uint8)
    overlay.png       axial slice with the highest ROI probability, mask in red (Fig. 2)
The outputs carry the input's spacing, origin and direction, so they overlay the scan in
3D Slicer or ITK-SNAP.

Each scan's folder is written beside it under a temporary name and renamed over the old
one, so it is complete or absent. ``OUT`` holds one run's outputs: the folders of an
earlier ``predict`` into it (recognised by their files) that this run does not write are
removed at its end, also when it stops on a bad scan.

``prediction.json`` also records what may make the probability mean little:
``coverage`` (the share of the model's input the scan fills) with ``coverage_warning``
(a scan far smaller than the model's field of view, e.g. a few slices; else null), and
``hu_offset`` with ``calibration_warning`` (raw CT numbers corrected by -1024, or
intensities that are neither HU nor raw CT numbers; else null). Both warnings are also
logged.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from lymphdx.core.config import DataConfig
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import atomic_dir, atomic_path, ensure_writable_dir, write_json
from lymphdx.core.zeta import roi_mask
from lymphdx.data.calibration import hu_offset, intensity_calibration
from lymphdx.data.grid import (
    check_coverage,
    coverage,
    coverage_warning,
    preprocess_image,
    to_original,
)
from lymphdx.data.preprocess import Normalizer, load_normalizers
from lymphdx.engine.run_folder import load_model
from lymphdx.engine.teacher import predict_with_tta
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Volume, to_sitk
from lymphdx.models.domain_norm import domains

__all__ = ["predict", "output_name", "save_overlay"]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
#: What a scan's output folder holds (how an earlier run's folders are recognised).
OUTPUT_FILES = frozenset({"prediction.json", "roi_prob.nii.gz", "roi_mask.nii.gz", "overlay.png"})

log = logging.getLogger("lymphdx")


def output_name(path: Path) -> str:
    """Folder name for a scan's outputs: file name without its volume extension."""
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "scan"


def save_overlay(
    path: Path,
    hu_zyx: np.ndarray,
    prob_zyx: np.ndarray,
    mask_zyx: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    title: str,
    window: tuple[float, float] = (-160, 240),
) -> int:
    """Write the axial slice with the highest ROI probability, mask in red; returns its z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.unravel_index(np.argmax(prob_zyx), prob_zyx.shape)[0])
    sx, sy = spacing_xyz[0], spacing_xyz[1]
    fig, ax = plt.subplots(figsize=(6, 6 * hu_zyx.shape[1] * sy / (hu_zyx.shape[2] * sx) + 0.4))
    ax.imshow(
        hu_zyx[z],
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        aspect=sy / sx,
        interpolation="nearest",
    )
    # the probability map as a yellow haze (visible even where nothing passes ζ)
    haze = np.zeros((*prob_zyx.shape[1:], 4), dtype=np.float32)
    haze[..., 0], haze[..., 1] = 1.0, 0.85
    haze[..., 3] = 0.6 * np.clip(prob_zyx[z], 0, 1)
    ax.imshow(haze, aspect=sy / sx, interpolation="nearest")
    red = np.zeros((*mask_zyx.shape[1:], 4), dtype=np.float32)
    red[..., 0] = 1.0
    red[..., 3] = 0.45 * (mask_zyx[z] > 0)
    ax.imshow(red, aspect=sy / sx, interpolation="nearest")
    if mask_zyx[z].any():
        ax.contour(mask_zyx[z] > 0, levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(
        f"{title}\naxial slice {z}; ROI probability max {prob_zyx[z].max():.2f} (yellow), "
        "mask in red",
        fontsize=9,
    )
    ax.axis("off")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)
    return z


@torch.no_grad()
def predict(
    run_dir: str | Path,
    images: list[str | Path],
    out_dir: str | Path,
    domain: str = "weak",
    which: str = "best",
) -> list[dict[str, Any]]:
    """Predict every scan in ``images`` with the run's ``which`` checkpoint.

    ``domain`` picks the z-score of the hospital the scans come from (``weak``: the
    weakly-labelled set's hospital, the one the classifier is for) and, for a model with
    domain-specific batch norm (``model.norm: domain_batch``), that hospital's statistics.
    """
    config, model, _ = load_model(run_dir, which)
    normalizers = load_normalizers(Path(run_dir) / "normalization.json")
    if domain not in normalizers:
        raise LymphdxError(f"unknown domain {domain!r}; the run has {sorted(normalizers)}")
    for image_path in map(Path, images):  # before any work: a typo fails at once
        if not image_path.exists():
            raise InputError("file does not exist", image_path)
    out_dir = ensure_writable_dir(out_dir)
    previous = _previous_outputs(out_dir)
    written: set[str] = set()
    results: list[dict[str, Any]] = []
    common = {
        "model": str(Path(run_dir).resolve()),
        "strategy": config.strategy,
        "threshold": config.evaluation.threshold,
        "roi_threshold": config.propagation.roi_threshold,
        "tta_flip": bool(config.evaluation.tta_flip),
    }
    try:
        for image_path, name in zip(map(Path, images), _output_names(images), strict=True):
            with domains(model, STRONG if domain == "strong" else WEAK):  # DSBN: the hospital's
                result = _predict_one(
                    config.data, model, normalizers[domain], image_path, out_dir / name, common
                )
            results.append(result)
            written.add(name)
    finally:  # also when a scan is refused: OUT holds this run's complete outputs only
        _remove_previous(out_dir, previous - written)
    return results


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


def _calibration_note(volume: Volume, cfg: DataConfig) -> tuple[float, str | None]:
    """The offset that maps the scan to HU and a warning when it is not 0 or not known
    (``intensity_calibration``; none when ``data.hu_offset`` says what scans hold)."""
    calibration = intensity_calibration(volume.array)
    offset = hu_offset(calibration, cfg)
    if cfg.hu_offset is not None or calibration.verdict == "hu":
        return offset, None
    if calibration.verdict == "raw":
        return offset, (
            "the scan holds raw CT numbers, not Hounsfield units (air near 0, fat/soft "
            "tissue near 1000: HU + 1024); corrected by -1024"
        )
    return offset, (
        "the calibration cannot be told: the intensities are neither Hounsfield units nor "
        f"raw CT numbers ({calibration.describe()}); the scan was used as it is, so the "
        "probability may mean nothing"
    )


def _predict_one(
    cfg: DataConfig,
    model: torch.nn.Module,
    norm: Normalizer,
    image_path: Path,
    folder: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    """Predict one scan and write its outputs to ``folder`` (complete, or not at all)."""
    volume = io.read_volume(image_path)
    check_coverage(volume.geometry, volume.shape_xyz, cfg, image_path)
    offset, calibration_note = _calibration_note(volume, cfg)
    if offset != 0.0:
        volume = Volume(volume.array + np.float32(offset), volume.geometry)
    covered, _ = coverage(volume.geometry, volume.shape_xyz, cfg)
    coverage_note = coverage_warning(volume.geometry, volume.shape_xyz, cfg)
    for note in (calibration_note, coverage_note):
        if note is not None:
            log.warning("%s: %s", image_path, note)
    original = to_sitk(volume.array, volume.geometry)
    array, grid = preprocess_image(original, cfg)
    out = predict_with_tta(
        model, torch.from_numpy(norm(array))[None, None], flips=common["tta_flip"]
    )
    probability = float(out["cls"][0])
    roi_canonical = out["roi"][0, 0].numpy().astype(np.float32)
    prob_zyx = sitk.GetArrayFromImage(to_original(roi_canonical, grid, original))
    result = {
        "image": str(image_path),
        "probability": probability,
        "label": int(probability > common["threshold"]),
        "threshold": common["threshold"],
        "roi_threshold": common["roi_threshold"],
        "tta_flip": common["tta_flip"],
        "model": common["model"],
        "strategy": common["strategy"],
        "coverage": round(covered, 6),
        "coverage_warning": coverage_note,
        "hu_offset": offset,
        "calibration_warning": calibration_note,
    }
    with atomic_dir(folder) as tmp:  # written beside, then renamed over the old folder
        return _write_outputs(tmp, folder.name, volume, prob_zyx, common["roi_threshold"], result)


def _write_outputs(
    folder: Path,
    name: str,
    volume: Volume,
    prob_zyx: np.ndarray,
    zeta: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Write one scan's ROI maps, overlay and ``prediction.json`` into ``folder``.

    ``result`` holds the probability and the thresholds; the ROI summary is added to it.
    """
    mask_zyx = roi_mask(prob_zyx, zeta).astype(np.uint8)
    io.write_volume(folder / "roi_prob.nii.gz", prob_zyx, volume.geometry)
    io.write_volume(folder / "roi_mask.nii.gz", mask_zyx, volume.geometry)
    verdict = "positive" if result["label"] else "negative"
    slice_z = save_overlay(
        folder / "overlay.png",
        volume.array,
        prob_zyx,
        mask_zyx,
        volume.geometry.spacing,
        f"{name}: P(metastatic) = {result['probability']:.3f} -> {verdict}",
    )
    result = {
        **result,
        "roi_max_probability": float(prob_zyx.max()),
        "roi_voxels": int(mask_zyx.sum()),
        "overlay_slice": slice_z,
    }
    write_json(folder / "prediction.json", result)
    return result
