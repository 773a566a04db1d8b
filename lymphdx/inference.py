"""``predict``: run a trained model on scans and write results a radiologist can open.

Per scan, into ``OUT/<name>/``:
    prediction.json   probability of metastatic lymph nodes, label, thresholds
    roi_prob.nii.gz   ROI probability map g(f(v)) on the scan's own grid (float32)
    roi_mask.nii.gz   ROI mask, probability > ζ (``roi_threshold``), same grid (uint8)
    overlay.png       axial slice with the highest ROI probability, mask in red (Fig. 2)
The outputs carry the input's spacing, origin and direction, so they overlay the scan in
3D Slicer or ITK-SNAP.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from lymphdx.data import io
from lymphdx.data.preprocess import (
    check_coverage,
    load_normalizers,
    preprocess_image,
    to_original,
)
from lymphdx.errors import InputError, LymphdxError
from lymphdx.evaluation.evaluate import load_model
from lymphdx.fileutil import atomic_dir, atomic_path, ensure_writable_dir, write_json
from lymphdx.models.domain_norm import domains
from lymphdx.training.propagation import STRONG, WEAK

__all__ = ["predict", "output_name", "save_overlay"]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


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
    norm = normalizers[domain]
    zeta = config.propagation.roi_threshold
    threshold = config.evaluation.threshold
    out_dir = ensure_writable_dir(out_dir)
    results, used = [], set()
    for image_path in map(Path, images):
        name = output_name(image_path)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        volume = io.read_volume(image_path)
        check_coverage(volume.geometry, volume.shape_xyz, config.data, image_path)
        original = io.to_sitk(volume.array, volume.geometry)
        array, grid = preprocess_image(original, config.data)
        x = torch.from_numpy(norm(array))[None, None]
        with domains(model, STRONG if domain == "strong" else WEAK):  # DSBN: the hospital's
            out = model(x)
        probability = float(torch.sigmoid(out["cls"])[0])
        roi_canonical = torch.sigmoid(out["roi"])[0, 0].numpy().astype(np.float32)
        roi_prob = to_original(roi_canonical, grid, original)
        prob_zyx = sitk.GetArrayFromImage(roi_prob)
        label = int(probability > threshold)
        result = {
            "image": str(image_path),
            "probability": probability,
            "label": label,
            "threshold": threshold,
            "roi_threshold": zeta,
            "model": str(Path(run_dir).resolve()),
            "strategy": config.strategy,
        }
        with atomic_dir(out_dir / name) as folder:  # a scan's outputs: all or none
            results.append(_write_outputs(folder, name, volume, prob_zyx, zeta, result))
    return results


def _write_outputs(
    folder: Path,
    name: str,
    volume: io.Volume,
    prob_zyx: np.ndarray,
    zeta: float,
    result: dict[str, Any],
) -> dict[str, Any]:
    """Write one scan's ROI maps, overlay and ``prediction.json`` into ``folder``.

    ``result`` holds the probability and the thresholds; the ROI summary is added to it.
    """
    mask_zyx = (prob_zyx > zeta).astype(np.uint8)
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
