"""The ROI patches' own batch-norm statistics, re-estimated after training.

``evaluation.bn_stats: roi_patches``. A run on tiles (``training.sampler: tiles``)
forwards two kinds of input in train mode at every step: the weak scans' bags (small tiles
anywhere in the weak hospital's scans, with the bags' own augmentation) and the strong
set's ROI patches (node-oversampled). Both passes move every batch norm's running
statistics, so eval mode normalises with a mix of the two; the ROI decoder, though, only
ever learnt on patches normalised by the patches' own batch statistics. In some runs that
mix is far enough from the patches' statistics that the decoder's eval-mode map falls
under ζ almost everywhere while its training loss is fine (``benchmarks/bn_stats_probe.py``).

Here every weight stays as trained, and the statistics become the equal-weight average
over ``PATCH_BATCHES`` batches of ROI patches drawn from the strong training scans as
training draws them (``training.roi_patch``, ``training.roi_foreground``,
``training.strong_batch_size``; no augmentation; seeded by the run's seed). Every scan of
either hospital is then scored with them. The statistics are kept in ``RUN/bn_stats.pt``
(``engine.domain_stats``) for the weights they were estimated for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lymphdx.core.config import Config
from lymphdx.core.errors import LymphdxError
from lymphdx.data.datasets import VolumeSet
from lymphdx.data.sampling import patch_corner
from lymphdx.data.tile_sampler import crop_padded
from lymphdx.engine.run_data import RunData
from lymphdx.engine.teacher import update_bn

__all__ = ["PATCH_BATCHES", "estimate_patch_stats", "roi_patch_batches", "patch_stats_stamp"]

#: batches of ROI patches the statistics average (64 × 4 patches of 64 × 64 × 32 voxels:
#: about a minute on one CPU thread)
PATCH_BATCHES = 64


def _patch_size(config: Config) -> tuple[int, int, int]:
    patch = config.training.roi_patch
    if patch is None:
        raise LymphdxError(
            "evaluation.bn_stats: roi_patches re-estimates the statistics on ROI patches, "
            "and this run trained on whole scans (training.roi_patch unset): set "
            "evaluation.bn_stats: trained"
        )
    x, y, z = patch
    return z, y, x


def roi_patch_batches(
    config: Config, volumes: VolumeSet, n_batches: int = PATCH_BATCHES
) -> Iterator[torch.Tensor]:
    """``n_batches`` batches ``(training.strong_batch_size, 1, d, h, w)`` of ROI patches
    of ``volumes`` (the strong training scans, with masks): scans drawn uniformly, each
    patch centred on one of its node voxels with probability ``training.roi_foreground``
    (else anywhere), cut as training cuts them (``patch_corner``, ``crop_padded``)."""
    tcfg = config.training
    patch = _patch_size(config)
    rng = np.random.default_rng(config.seed)
    for _ in range(n_batches):
        items = []
        for i in rng.integers(len(volumes), size=tcfg.strong_batch_size):
            image, mask = volumes.image(int(i)), volumes.mask(int(i))
            corner = patch_corner(mask, patch, tcfg.roi_foreground, rng)
            items.append(crop_padded(image, corner, patch))
        yield torch.from_numpy(np.stack(items)[:, None].copy())


def estimate_patch_stats(model: nn.Module, config: Config, data: RunData) -> nn.Module:
    """``model`` (eval mode) with every batch norm's statistics the average over the
    strong training scans' ROI patches (``roi_patch_batches``); returned changed in place."""
    volumes = data.volumes("strong", "train", masks=True)
    if len(volumes) == 0:  # update_bn would leave its statistics reset (mean 0, var 1)
        raise LymphdxError(
            "evaluation.bn_stats: roi_patches estimates the statistics on the strong set's "
            "training scans, and it has none: set evaluation.bn_stats: trained"
        )
    update_bn(model, roi_patch_batches(config, volumes), forward=lambda m, x: m(x, roi=True))
    return model.eval()


def patch_stats_stamp(config: Config) -> dict[str, Any]:
    """What the statistics depend on besides the weights."""
    t = config.training
    return {
        "roi_patch": list(_patch_size(config)),
        "roi_foreground": t.roi_foreground,
        "strong_batch_size": t.strong_batch_size,
        "batches": PATCH_BATCHES,
        "seed": config.seed,
    }
