"""``training.sampler: tiles``: scans read as bags of tiles in training (candidate-region
multiple-instance learning, ARCHITECTURE.md "Clinical resolution").

``BagSampler`` owns what the bags need between steps: each training scan's peak centres
from the last refresh (``refresh``: the teacher's sliding-window ROI map, its
``inference.bag_tiles`` highest peaks half a tile apart, ``engine.candidates.peaks``) and
each scan's body box (where random tiles go). ``load`` cuts one scan's bag (the peak tiles
plus ``training.bag_random`` random ones) from its normalised volume and from any volume
on its grid (pseudo masks), each tile augmented with its own seeded draw. The step cost is
the bag's, whatever the scan's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lymphdx.core.config import Config
from lymphdx.core.seeding import seeded_rng
from lymphdx.data.datasets import VolumeSet
from lymphdx.data.tile_sampler import bag_corners, body_box, crop_padded
from lymphdx.engine.candidates import peaks
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import SlidingWindowInferer

__all__ = ["BagSampler"]

log = logging.getLogger("lymphdx")

Augment = Callable[[tuple[int, ...], dict[str, np.ndarray]], dict[str, np.ndarray]]


class BagSampler:
    """The bags of the weak and strong training scans (see the module docstring).

    Args:
        config: the run's config (``inference.bag_tile``, ``inference.bag_tiles``,
            ``training.bag_random``, ``training.bag_refresh_overlap``, ``data.hu_window``).
    """

    def __init__(self, config: Config) -> None:
        x, y, z = config.inference.bag_tile or config.inference.tile
        self.tile = (z, y, x)  # (d, h, w): the bags' tiles, as the inferer cuts them
        self.n_peaks = config.inference.bag_tiles
        self.n_random = config.training.bag_random
        self.floor = float(config.data.hu_window[0])
        overlap = config.training.bag_refresh_overlap
        window = config.inference
        if overlap is not None:  # the refresh's own overlap
            window = window.model_copy(update={"overlap": overlap})
        self.inferer = SlidingWindowInferer(window)
        self.centres: dict[str, list[np.ndarray | None]] = {}  # set -> per scan (K, 3)
        self.refreshed_at = -1  # the epoch of the last refresh
        self._boxes: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    # -- state (checkpoints) ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "refreshed_at": self.refreshed_at,
            "centres": {
                name: [None if c is None else torch.from_numpy(c) for c in scans]
                for name, scans in self.centres.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshed_at = int(state["refreshed_at"])
        self.centres = {
            name: [None if c is None else c.numpy().astype(np.int64) for c in scans]
            for name, scans in state["centres"].items()
        }

    # -- the refresh -----------------------------------------------------------------
    @torch.no_grad()
    def refresh(
        self,
        model: torch.nn.Module,
        volumes: VolumeSet,
        name: str,
        epoch: int,
        ctx: DistContext | None = None,
    ) -> dict[str, float]:
        """Each scan's peak centres ``(K, 3)`` from ``model``'s sliding-window ROI map
        (no flip: the peaks, not the probabilities, matter); returns a summary for the
        history (the mean of the peaks' probabilities). With a distributed ``ctx`` each
        rank maps its block of the scans (``ctx.shard``) and every rank gets all peaks."""
        ctx = ctx or DistContext()
        was_training = model.training
        model.eval()
        separation = [max(1, t // 2) for t in self.tile]
        mine: list[tuple[np.ndarray, list[float]]] = []
        try:
            for i in ctx.shard(range(len(volumes))):
                image = torch.from_numpy(np.ascontiguousarray(volumes.image(i)))[None, None]
                prob = self.inferer.roi_map(model, image, flips=False)[0, 0].numpy()
                centres = peaks(prob, self.n_peaks, separation)
                found = np.array(centres, dtype=np.int64).reshape(-1, 3)
                mine.append((found, [float(prob[c]) for c in centres]))
        finally:
            model.train(was_training)
        every = [scan for part in ctx.all_gather_object(mine) for scan in part]
        self.centres[name] = [found for found, _ in every]
        self.refreshed_at = epoch
        heights = [h for _, hs in every for h in hs]
        return {f"bag_peak_prob_{name}": float(np.mean(heights)) if heights else 0.0}

    # -- one scan's bag --------------------------------------------------------------
    def _box(self, volumes: VolumeSet, name: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Scan ``i``'s body box (voxels above the HU window's floor), computed once."""
        if (name, i) not in self._boxes:
            floor = float(volumes.normalizer(np.array([self.floor], np.float32))[0])
            self._boxes[(name, i)] = body_box(volumes.image(i), floor + 1e-3)
        return self._boxes[(name, i)]

    def corners(
        self, volumes: VolumeSet, name: str, i: int, key: tuple[int, ...]
    ) -> list[tuple[int, ...]]:
        """The first voxels of scan ``i``'s bag for the draw ``key``."""
        scans = self.centres.get(name)
        centres = None if scans is None else scans[i]
        shape = volumes.image(i).shape
        rng = seeded_rng(*key, 2)
        box = self._box(volumes, name, i)
        return bag_corners(shape, self.tile, centres, self.n_random, rng, box)

    def load(
        self,
        volumes: VolumeSet,
        name: str,
        i: int,
        key: tuple[int, ...],
        extra: dict[str, np.ndarray],
        augment: Augment,
    ) -> list[dict[str, np.ndarray]]:
        """Scan ``i``'s bag: per tile ``{"image": (d, h, w), **extra's tiles}`` (``extra``:
        volumes on the scan's grid, e.g. ``pseudo_mask``; padded with 0 outside the scan,
        the normalised mean for the image), each augmented by ``augment`` with
        ``(*key, tile index)``."""
        vols = {"image": volumes.image(i), **extra}
        tiles = []
        for t, corner in enumerate(self.corners(volumes, name, i, key)):
            cut = {n: crop_padded(v, corner, self.tile) for n, v in vols.items()}
            tiles.append(augment((*key, t), cut))
        return tiles
