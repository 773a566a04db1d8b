"""Preprocessed, normalised volumes of one set and split, and batching with seeded order.

Volumes come from the preprocessing cache (never from the source files after the first
pass) and are held in memory once loaded when they fit ``memory_budget``; larger data
(the paper preset) is re-read from the cache's memory-mapped files each time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lymphdx.core.seeding import seeded_rng
from lymphdx.data.manifest import StrongRecord, WeakRecord
from lymphdx.data.preprocess import Normalizer, PreprocessCache

__all__ = ["VolumeSet", "Batch", "epoch_order"]


@dataclass
class Batch:
    """A batch of scans. ``images`` ``(B, 1, D, H, W)`` float32; ``labels`` ``(B,)`` or None;
    ``masks`` ``(B, 1, D, H, W)`` uint8 or None; ``index`` positions in the set."""

    images: torch.Tensor
    labels: torch.Tensor | None
    masks: torch.Tensor | None
    index: list[int]
    patient_ids: list[str]


class VolumeSet:
    """The volumes of one set (weak or strong) restricted to some patients.

    Args:
        records: manifest records (weak: with labels; strong: with masks).
        cache: preprocessing cache.
        normalizer: the set's domain z-score (fitted on its training split).
        load_masks: read the strong set's masks too.
        memory_budget: bytes of volumes to keep in memory once loaded.
    """

    def __init__(
        self,
        records: Sequence[WeakRecord | StrongRecord],
        cache: PreprocessCache,
        normalizer: Normalizer,
        load_masks: bool = False,
        memory_budget: int = 4 << 30,
    ) -> None:
        self.records = list(records)
        self.cache = cache
        self.normalizer = normalizer
        self.load_masks = load_masks
        self.memory_budget = memory_budget
        # data.fit whole: the scans' sizes are known once the first is read
        self.keep = (
            cache.cfg.shape is None
            or int(np.prod(cache.cfg.shape)) * 5 * len(self.records) <= memory_budget
        )
        self._images: dict[int, np.ndarray] = {}
        self._masks: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of every volume: the canonical grid (config ``shape`` is x, y, z).
        Under ``data.fit: whole`` each scan has its own (``image(i).shape``): an error."""
        if self.cache.cfg.shape is None:
            raise ValueError("data.fit: whole: the volumes have no common shape")
        x, y, z = self.cache.cfg.shape
        return (z, y, x)

    @property
    def patient_ids(self) -> list[str]:
        return [r.patient_id for r in self.records]

    @property
    def labels(self) -> np.ndarray | None:
        """``(N,)`` int labels of a weak set, else None."""
        if self.records and isinstance(self.records[0], WeakRecord):
            return np.array([r.label for r in self.records], dtype=np.int64)
        return None

    def image(self, i: int) -> np.ndarray:
        """Normalised ``(D, H, W)`` float32 volume ``i``."""
        if i in self._images:
            return self._images[i]
        rec = self.records[i]
        arr = self.normalizer(self.cache.image(rec.image, rec.patient_id)).astype(np.float32)
        if self.keep and self.cache.cfg.shape is None and not self._images:
            # scans of their own size: keep them while the first one's size times the set's
            # (and its masks') fits the budget
            self.keep = arr.size * 5 * len(self.records) <= self.memory_budget
        if self.keep:
            self._images[i] = arr
        return arr

    def mask(self, i: int) -> np.ndarray:
        """Binary ``(D, H, W)`` uint8 mask of strong-set volume ``i``."""
        if i in self._masks:
            return self._masks[i]
        rec = self.records[i]
        assert isinstance(rec, StrongRecord)
        arr = self.cache.mask(rec.mask, rec.image, rec.patient_id)
        if self.keep:
            self._masks[i] = arr
        return arr

    def batch(self, index: Sequence[int], flip: Sequence[bool] | None = None) -> Batch:
        """Stack volumes ``index``; ``flip[k]`` mirrors item k left-right (x axis)."""
        flip = flip if flip is not None else [False] * len(index)

        def stack(get) -> torch.Tensor:
            arrays = [get(i)[..., ::-1] if f else get(i) for i, f in zip(index, flip, strict=True)]
            return torch.from_numpy(np.stack(arrays)[:, None].copy())

        labels = self.labels
        return Batch(
            images=stack(self.image),
            labels=None if labels is None else torch.from_numpy(labels[list(index)]),
            masks=stack(self.mask) if self.load_masks else None,
            index=list(index),
            patient_ids=[self.records[i].patient_id for i in index],
        )


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, stream: int = 0) -> list[list[int]]:
    """Seeded shuffled batches of ``range(n)`` for one epoch (the last may be smaller).

    Depends only on ``(seed, epoch, stream)``, so a resumed run draws the same batches.
    """
    rng = seeded_rng(seed, epoch, stream)
    order = rng.permutation(n).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
