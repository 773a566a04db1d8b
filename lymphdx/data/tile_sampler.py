"""Where a training bag's tiles lie in a scan (``training.sampler: tiles``).

A scan is read as a bag of tiles (ARCHITECTURE.md, "Clinical resolution"): in training,
the tiles centred on the ROI map's peaks of the last candidate refresh (``centres``) plus
``n_random`` tiles at uniformly drawn places inside the body; at inference, the peaks of
the sliding-window map (``engine.inferer``). A tile is placed as the inferer places it: centred on
its voxel and moved inside the scan, or, along an axis where the scan is shorter than a
tile, the scan centred in the tile with the rest padded (half before, as MONAI pads).
``crop_padded`` cuts it, padding with a constant. All randomness comes from the caller's
generator, so a resumed run replays its bags.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["body_box", "crop_padded", "tile_corner", "bag_corners"]


def tile_corner(
    centre: Sequence[int], tile: Sequence[int], shape: Sequence[int]
) -> tuple[int, ...]:
    """The first voxel ``(z, y, x)`` of a ``tile`` ``(d, h, w)`` centred on ``centre`` in a
    scan of ``shape`` ``(D, H, W)``: inside the scan where it fits; where the scan is
    shorter than the tile, ``-(t - s) // 2`` (the scan centred, padded around)."""
    corner = []
    for c, t, s in zip(centre, tile, shape, strict=True):
        if s >= t:
            corner.append(int(np.clip(int(c) - t // 2, 0, s - t)))
        else:
            corner.append(-((t - s) // 2))
    return tuple(corner)


def crop_padded(
    volume: np.ndarray, corner: Sequence[int], size: Sequence[int], fill: float = 0.0
) -> np.ndarray:
    """``volume[..., corner : corner + size]`` over its last three axes, with the part
    outside the volume filled with ``fill``; always a new, writable array."""
    shape = volume.shape[-3:]
    lo = [max(0, c) for c in corner]
    hi = [min(s, c + t) for c, t, s in zip(corner, size, shape, strict=True)]
    inside = volume[(..., *(slice(a, b) for a, b in zip(lo, hi, strict=True)))]
    if tuple(inside.shape[-3:]) == tuple(size):
        return np.array(inside)  # a copy: a tile of a read-only memory-mapped scan
    out = np.full((*volume.shape[:-3], *size), fill, dtype=volume.dtype)
    at = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner, strict=True))
    out[(..., *at)] = inside
    return out


def body_box(array: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box ``(lo, hi)`` (inclusive voxel indices ``(z, y, x)``) of the voxels
    of ``array`` ``(D, H, W)`` above ``floor`` (the HU window's floor in the array's
    units: air and background lie on it); the whole array when none is."""
    above = array > floor
    if not above.any():
        return np.zeros(3, dtype=np.int64), np.array(array.shape, dtype=np.int64) - 1
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        where = np.flatnonzero(above.any(axis=other))
        lo.append(where[0])
        hi.append(where[-1])
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)


def bag_corners(
    shape: Sequence[int],
    tile: Sequence[int],
    centres: np.ndarray | None,
    n_random: int,
    rng: np.random.Generator,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple[int, ...]]:
    """The first voxels of one scan's training bag: a tile on each of ``centres``
    ``(K, 3)`` (the last refresh's peaks; None or empty before the first refresh), then
    ``n_random`` tiles centred on voxels drawn uniformly in ``box`` (``body_box``; default
    the whole scan). A bag holds at least one tile."""
    lo, hi = box if box is not None else (np.zeros(3, np.int64), np.array(shape) - 1)
    picked = [] if centres is None else [tuple(int(v) for v in c) for c in centres]
    n = max(n_random, 0 if picked else 1)
    for _ in range(n):
        picked.append(tuple(int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)))
    return [tile_corner(c, tile, shape) for c in picked]
