"""Candidate regions of a scan: the tiles that the classifier reads, centred on the ROI
map's highest mutually separated peaks (candidate-region MIL, ARCHITECTURE.md "Clinical
resolution").

A peak is a voxel equal to the maximum of the map over the box of half a tile around it
(``scipy.ndimage.maximum_filter``, as ``skimage.feature.peak_local_max`` finds peaks a
minimum distance apart); the peaks are then taken greedily from the highest,
each one at least half a tile away from those taken before (along some axis: boxes, not
spheres), so that K tiles cover K different places. Ties go to the lowest flat index
(C order), so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

__all__ = ["peaks", "tile_starts"]


def peaks(prob: np.ndarray, k: int, separation: Sequence[int]) -> list[tuple[int, int, int]]:
    """The ``k`` highest mutually separated peaks of a map ``prob`` ``(D, H, W)``, highest
    first, as ``(z, y, x)`` voxel indices.

    Two peaks are separated when they lie at least ``separation[i]`` voxels apart along
    some axis ``i`` (``(D, H, W)`` order; half a tile). A plateau counts as peaks
    everywhere on it; the greedy choice keeps one per box. Fewer than ``k`` are returned
    when the map has fewer separated peaks (a map smaller than the separation has one).
    """
    prob = np.asarray(prob)
    if prob.ndim != 3 or prob.size == 0:
        raise ValueError(f"expected a non-empty (D, H, W) map, got shape {prob.shape}")
    if not np.isfinite(prob).all():
        raise ValueError("the map holds NaN or infinite values")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    sep = np.asarray(separation, dtype=np.int64)
    if sep.shape != (3,) or (sep < 1).any():
        raise ValueError(f"separation must be 3 positive voxel counts, got {list(separation)}")
    # the box of half a tile around a voxel: a peak is the maximum of its own box, so two
    # unequal peaks are always separated; equal ones (plateaus) are thinned below
    size = tuple(int(2 * s - 1) for s in sep)
    local_max = prob >= ndimage.maximum_filter(prob, size=size, mode="nearest")
    where = np.flatnonzero(local_max)  # ascending flat index: ties keep C order
    coords = np.stack(np.unravel_index(where, prob.shape), axis=1)  # (n, 3)
    values = prob.reshape(-1)[where].astype(np.float64)
    chosen: list[tuple[int, int, int]] = []
    alive = np.ones(len(where), dtype=bool)
    for _ in range(k):
        if not alive.any():
            break
        # argmax returns the first of equal values: the lowest flat index among ties
        i = int(np.argmax(np.where(alive, values, -np.inf)))
        centre = coords[i]
        chosen.append((int(centre[0]), int(centre[1]), int(centre[2])))
        near = (np.abs(coords - centre) < sep).all(axis=1)
        alive &= ~near
    return chosen


def tile_starts(
    centres: Sequence[Sequence[int]],
    tile: Sequence[int],
    shape: Sequence[int],
    offset: Sequence[int] = (0, 0, 0),
) -> list[tuple[int, int, int]]:
    """The first voxels ``(z, y, x)`` of tiles of size ``tile`` ``(d, h, w)`` centred on
    ``centres`` (voxels of the unpadded scan), in a scan padded to ``shape`` ``(D, H, W)``
    (at least a tile along each axis) whose voxel 0 lies at ``offset`` (the padding before
    it). A tile that would stick out is moved inside; tiles that then coincide are kept
    once, in the order of ``centres``."""
    t = np.asarray(tile, dtype=np.int64)
    size = np.asarray(shape, dtype=np.int64)
    if (size < t).any():
        raise ValueError(f"a scan of {list(shape)} voxels is smaller than a tile {list(tile)}")
    starts: list[tuple[int, int, int]] = []
    for c in centres:
        s = np.clip(np.asarray(c) + np.asarray(offset) - t // 2, 0, size - t)
        start = (int(s[0]), int(s[1]), int(s[2]))
        if start not in starts:
            starts.append(start)
    return starts
