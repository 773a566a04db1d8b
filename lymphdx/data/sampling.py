"""Seeded batch streams and node-aware patches for training counted in optimiser steps.

``stream_batches`` cuts an endless sequence of shuffled passes over a set into the
batches of one epoch, so a set is drawn at its own pace whatever the other set's size.
``patch_corner`` places an ROI training patch: with probability ``foreground`` centred on
a random node voxel (nnU-Net's foreground oversampling), else anywhere in the volume.
Both depend only on their seeds, so a resumed run replays them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lymphdx.core.seeding import seeded_rng

__all__ = ["stream_batches", "patch_corner"]


def stream_batches(
    n: int, batch_size: int, steps: int, seed: int, epoch: int, stream: int
) -> list[list[int]]:
    """The ``steps`` batches of epoch ``epoch``: positions into ``range(n)`` taken in turn
    from the seeded passes ``rng(seed, stream, k).permutation(n)``, k = 0, 1, ….

    Every batch holds ``min(batch_size, n)`` items; epoch e starts where epoch e − 1 ended.
    """
    if n <= 0 or steps <= 0:
        return []
    size = min(batch_size, n)
    start, need = epoch * steps * size, steps * size
    k, offset = divmod(start, n)
    items: list[int] = []
    while len(items) < offset + need:
        items += seeded_rng(seed, stream, k).permutation(n).tolist()
        k += 1
    items = items[offset : offset + need]
    return [items[i * size : (i + 1) * size] for i in range(steps)]


def patch_corner(
    mask: np.ndarray,
    patch: Sequence[int],
    foreground: float,
    rng: np.random.Generator,
    foreground_voxels: np.ndarray | None = None,
) -> tuple[int, ...]:
    """The first voxel of a ``patch`` (``(d, h, w)``) inside a ``mask``'s ``(D, H, W)``
    grid: centred on a random voxel of ``foreground_voxels`` (``(K, 3)``, default
    ``argwhere(mask)``) with probability ``foreground`` (when there is one), else on a
    uniformly random voxel; shifted to lie inside the volume."""
    shape, size = np.array(mask.shape), np.array(patch)
    if rng.random() < foreground:
        voxels = np.argwhere(mask) if foreground_voxels is None else foreground_voxels
        centre = voxels[rng.integers(len(voxels))] if len(voxels) else None
    else:
        centre = None
    if centre is None:
        centre = np.array([rng.integers(s) for s in shape])
    corner = np.clip(centre - size // 2, 0, shape - size)
    return tuple(int(c) for c in corner)
