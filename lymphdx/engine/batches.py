"""The trainer's batches: each epoch's global batches drawn from seeded streams (weak
scans, strong whole scans, strong ROI patches on nodes), and this rank's block of a batch
loaded and augmented, every draw a function of (seed, epoch, step, stream, place)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lymphdx.core.config import Config
from lymphdx.core.seeding import seeded_rng
from lymphdx.core.strategies import Strategy
from lymphdx.data.augment import Augmenter
from lymphdx.data.datasets import VolumeSet, epoch_order
from lymphdx.data.sampling import patch_corner, stream_batches
from lymphdx.data.tile_sampler import crop_padded
from lymphdx.engine.bag_sampler import BagSampler
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.propagation import PseudoLabels


class BatchesMixin:
    """``Trainer``'s batch drawing and loading (``epoch_batches`` is a hook)."""

    config: Config
    ctx: DistContext
    strategy: Strategy
    epoch: int
    roi_warmup: int
    patch: tuple[int, ...] | None
    pseudo: PseudoLabels
    augmenter: Augmenter | None
    bag_augmenter: Augmenter | None
    weak_train: VolumeSet
    strong_train: VolumeSet | None
    bags: BagSampler | None
    _foreground: dict[int, np.ndarray]

    def _augmented(
        self, key: tuple[int, ...], volumes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One scan's volumes (``image`` and any on its grid), augmented with the draw of
        ``key``: MONAI transforms (``training.augmentation``), else a left-right flip with
        probability 1/2 (``training.flip_augment``), else as they are."""
        return self._augment_with(self.augmenter, key, volumes)

    def _bag_augmented(
        self, key: tuple[int, ...], volumes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One tile of a bag, as ``_augmented`` with ``training.bag_augmentation`` (when
        set) in place of ``training.augmentation``."""
        return self._augment_with(self.bag_augmenter, key, volumes)

    def _augment_with(
        self, augmenter: Augmenter | None, key: tuple[int, ...], volumes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        if augmenter is not None:
            return augmenter(key, volumes)
        if self.config.training.flip_augment and seeded_rng(*key).random() < 0.5:
            return {k: v[..., ::-1] for k, v in volumes.items()}
        return volumes

    def _foreground_voxels(self, i: int) -> np.ndarray:
        """``(K, 3)`` node voxels of strong training scan ``i`` (computed once)."""
        if i not in self._foreground:
            assert self.strong_train is not None
            self._foreground[i] = np.argwhere(self.strong_train.mask(i) > 0)
        return self._foreground[i]

    def _load(
        self, volumes: VolumeSet, batch: list[int], step: int, stream: int, kind: str
    ) -> dict[str, Any]:
        """This rank's block of the global ``batch`` (positions in ``volumes``), augmented:
        ``image`` ``(b, 1, D, H, W)`` and, by ``kind``, ``labels`` (weak), ``pseudo_mask``
        and ``pseudo_weight`` (weak, once propagated), ``mask`` (strong whole scans with
        real masks) or ROI patches as ``image`` with their ``mask`` (``patch``). Each scan's draw
        depends on (seed, epoch, step, stream, its place in the global batch) only. With
        ``training.sampler: tiles`` a weak or strong scan is a bag of tiles (``BagSampler``):
        ``image`` ``(n_tiles, 1, d, h, w)`` (and its pseudo masks' tiles) and ``sizes``, the
        tiles of each scan in order."""
        mine = self.ctx.shard(range(len(batch)))
        pseudo = self.pseudo
        bags = self.bags if kind in ("weak", "strong") else None
        items, sizes = [], []
        for k in mine:
            i = batch[k]
            key = (self.config.seed, self.epoch, step, stream, k)
            vols = {"image": volumes.image(i)}
            if kind == "weak" and self.strategy.pseudo_roi_weak and pseudo.weak_masks is not None:
                vols["pseudo_mask"] = pseudo.weak_masks[i]
                if pseudo.weak_mask_weights is not None:
                    vols["pseudo_weight"] = pseudo.weak_mask_weights[i]
            if volumes.load_masks and (kind == "patch" or (kind == "strong" and not self.patch)):
                vols["mask"] = volumes.mask(i)
            if kind == "patch":
                assert self.patch is not None
                rng = seeded_rng(*key, 1)
                corner = patch_corner(
                    vols["mask"],
                    self.patch,
                    self.config.training.roi_foreground,
                    rng,
                    self._foreground_voxels(i),
                )
                vols = {n: crop_padded(v, corner, self.patch) for n, v in vols.items()}
            if bags is not None:  # the scan as a bag of tiles (training.sampler: tiles)
                extra = {n: v for n, v in vols.items() if n != "image"}
                tiles = bags.load(volumes, kind, i, key, extra, self._bag_augmented)
                items += tiles
                sizes.append(len(tiles))
                continue
            items.append(self._augmented(key, vols))
        out: dict[str, Any] = {
            n: torch.from_numpy(np.stack([it[n] for it in items])[:, None].copy()) for n in items[0]
        }
        if bags is not None:
            out["sizes"] = sizes  # tiles per scan, in order
        index = [batch[k] for k in mine]
        out["index"] = index
        out["patient_ids"] = [volumes.records[i].patient_id for i in index]
        labels = volumes.labels
        if kind == "weak" and labels is not None:
            out["labels"] = torch.from_numpy(labels[index])
        return out

    def epoch_batches(self) -> list[tuple[list[int] | None, list[int] | None, list[int] | None]]:
        """This epoch's global batches ``(weak, strong whole scans, strong patches)``.

        ``training.steps_per_epoch`` steps, each set drawn from its own seeded stream
        (``sampling.stream_batches``); unset, one pass over the weak training split (the
        paper; a last batch of 1 is merged, it would break batch norm). The ROI warm-up
        draws no weak scans."""
        tcfg, seed, epoch = self.config.training, self.config.seed, self.epoch
        warmup = self.epoch < self.roi_warmup
        if tcfg.steps_per_epoch is not None:
            steps = tcfg.steps_per_epoch
            weak = stream_batches(len(self.weak_train), tcfg.batch_size, steps, seed, epoch, 0)
        else:
            weak = epoch_order(len(self.weak_train), tcfg.batch_size, seed, epoch, 0)
            # a batch of 1 breaks batch norm, and every rank needs a scan of every batch
            if len(weak) > 1 and len(weak[-1]) < max(2, self.ctx.world_size):
                weak[-2] += weak.pop()
            steps = len(weak)
        none: list[list[int] | None] = [None] * steps
        strong, patches = list(none), list(none)
        if self.strong_train is not None:
            n = len(self.strong_train)
            pseudo_cls = self.strategy.pseudo_cls_strong and self.pseudo.strong_targets is not None
            roi_whole = self.strategy.roi_strong and self.patch is None
            if pseudo_cls or roi_whole:
                size = tcfg.strong_batch_size
                if self.patch is not None and tcfg.pseudo_cls_batch_size is not None:
                    size = tcfg.pseudo_cls_batch_size
                strong = list(stream_batches(n, size, steps, seed, epoch, 1))
            if self.strategy.roi_strong and self.patch is not None:
                patches = list(stream_batches(n, tcfg.strong_batch_size, steps, seed, epoch, 2))
        if warmup:  # the decoder alone, on the strong set's masks
            return [
                (None, s if self.patch is None else None, p)
                for s, p in zip(strong, patches, strict=True)
            ]
        return list(zip(weak, strong, patches, strict=True))
