"""Node-level readings of an ROI map: each node that the map finds, measured as a
radiologist measures it.

A node is a connected region (26-connectivity) of the map at or above ``threshold``, of at
least ``min_voxels`` voxels; the ``max_nodes`` largest are kept. For each, in
``NODE_FEATURES`` order, on the working grid of voxel size ``voxel_mm``:

* ``short_mm``, ``long_mm``: the full short and long axes of the ellipsoid with the
  region's second moments (a solid ellipsoid of semi-axis a has variance a²/5 along it;
  each voxel counts as a box, so its own variance s²/12 is added), and ``roundness`` =
  short / long. Malignant nodes are large in short axis and round.
* ``log_volume``: log of the volume in mm³.
* ``fill``: the volume over that ellipsoid's volume: below 1 for a lobulated, irregular
  margin.
* ``prob_mean``: the map's mean probability over the region (how sure the map is).
* ``int_mean``, ``int_sd``, ``int_p10``: the image's mean, standard deviation
  (heterogeneous enhancement) and 10th percentile inside the region, in the model's
  normalised intensity units.
* ``core_drop``: the mean of the region's rim minus that of its core (the voxels deeper
  than half the region's largest depth, by the Euclidean distance transform in mm): a
  central low-attenuation core, necrosis, makes it positive. 0 when the region has no core.
* ``shell_mean``, ``shell_sd``: the image's mean and standard deviation in the shell
  ``SHELL_MM`` around the region, outside every region the map finds: a node lies in
  fat, a homogeneous dark shell, whereas a bowel loop, the commonest node mimic, lies
  against bowel, vessels and organs. NaN-free: a region with no shell voxel reads the
  region's own mean and 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["NODE_FEATURES", "SHELL_MM", "node_regions", "node_table"]

NODE_FEATURES = (
    "short_mm",
    "long_mm",
    "roundness",
    "log_volume",
    "fill",
    "prob_mean",
    "int_mean",
    "int_sd",
    "int_p10",
    "core_drop",
    "shell_mean",
    "shell_sd",
)
SHELL_MM = (1.0, 4.5)  # the shell's inner and outer distance from the region, in mm
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def node_regions(
    roi: np.ndarray, threshold: float = 0.5, min_voxels: int = 4, max_nodes: int = 32
) -> tuple[np.ndarray, list[int]]:
    """The connected regions of ``roi`` ``(D, H, W)`` at or above ``threshold``: their label
    volume ``(D, H, W)`` int32 (0 outside) and the labels of the nodes, in the order of
    ``node_table``'s rows (largest first, at least ``min_voxels``, at most ``max_nodes``)."""
    labels, n = ndimage.label(np.asarray(roi) >= threshold, structure=_STRUCTURE)
    if n == 0:
        return labels, []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    return labels, order[:max_nodes]


def node_table(
    roi: np.ndarray,
    image: np.ndarray,
    voxel_mm: Sequence[float],
    threshold: float = 0.5,
    min_voxels: int = 4,
    max_nodes: int = 32,
) -> np.ndarray:
    """``(n, len(NODE_FEATURES))`` float64 readings of the nodes that the ROI probability
    map ``roi`` ``(D, H, W)`` finds in ``image`` ``(D, H, W)`` (same grid, voxel size
    ``voxel_mm`` in (D, H, W) order), largest first; ``n`` may be 0."""
    roi = np.asarray(roi, dtype=np.float32)
    image = np.asarray(image, dtype=np.float32)
    if roi.shape != image.shape or roi.ndim != 3:
        raise ValueError(f"roi {roi.shape} and image {image.shape} must be one (D, H, W) grid")
    spacing = np.asarray(voxel_mm, dtype=np.float64)
    labels, order = node_regions(roi, threshold, min_voxels, max_nodes)
    if not order:
        return np.zeros((0, len(NODE_FEATURES)))
    boxes = ndimage.find_objects(labels)
    pad = np.ceil(SHELL_MM[1] / spacing).astype(int) + 1
    rows = []
    for lab in order:
        box = boxes[lab - 1]
        mask = labels[box] == lab
        wide = tuple(
            slice(max(b.start - p, 0), min(b.stop + p, size))
            for b, p, size in zip(box, pad, labels.shape, strict=True)
        )
        rows.append(
            _read_node(mask, roi[box], image[box], spacing)
            + _read_shell(labels[wide], lab, image[wide], spacing)
        )
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(NODE_FEATURES))


def _read_node(
    mask: np.ndarray, roi: np.ndarray, image: np.ndarray, spacing: np.ndarray
) -> list[float]:
    """The readings of one region ``mask`` (its bounding box) of ``roi`` and ``image``."""
    coords = np.argwhere(mask) * spacing  # (v, 3) mm
    cov = np.cov(coords, rowvar=False) if len(coords) > 1 else np.zeros((3, 3))
    cov = cov + np.diag(spacing**2 / 12.0)
    eig = np.clip(np.linalg.eigvalsh(cov), 0.0, None)  # ascending
    axes = 2.0 * np.sqrt(5.0 * eig)  # full axes of the moment-equivalent ellipsoid
    volume = float(mask.sum() * np.prod(spacing))
    ellipsoid = float(np.pi / 6.0 * np.prod(axes))
    values = image[mask]
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    inner = depth[mask]
    core = inner > 0.5 * inner.max()
    rim = ~core
    core_drop = float(values[rim].mean() - values[core].mean()) if core.any() and rim.any() else 0.0
    return [
        float(axes[0]),
        float(axes[2]),
        float(axes[0] / axes[2]) if axes[2] > 0 else 1.0,
        float(np.log(volume)),
        volume / ellipsoid if ellipsoid > 0 else 1.0,
        float(roi[mask].mean()),
        float(values.mean()),
        float(values.std()),
        float(np.percentile(values, 10)),
        core_drop,
    ]


def _read_shell(
    labels: np.ndarray, lab: int, image: np.ndarray, spacing: np.ndarray
) -> list[float]:
    """``shell_mean``, ``shell_sd`` of region ``lab`` of ``labels`` in ``image`` (a box
    around it wide enough for the shell)."""
    mask = labels == lab
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
    shell = (distance > SHELL_MM[0]) & (distance <= SHELL_MM[1]) & (labels == 0)
    if not shell.any():
        return [float(image[mask].mean()), 0.0]
    values = image[shell]
    return [float(values.mean()), float(values.std())]
