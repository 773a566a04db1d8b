"""Random augmentation of training scans with MONAI dictionary transforms.

One draw per scan transforms its image and every volume that lives on the image's grid
(mask, pseudo-mask, pseudo-mask weights) with the same spatial parameters: flips,
small rotations and scaling (``RandFlipd``, ``RandAffined``; masks by nearest
neighbour), then the image alone gets intensity scaling and shift, Gaussian noise and
Gaussian blur, and when asked nnU-Net's simulated low resolution and a gamma. Each draw
is seeded by a key (run seed, epoch, step, stream, scan position in the global batch),
so a resumed run, or the same batch split across any number of
processes, replays the same augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
)

from lymphdx.core.config import AugmentationConfig
from lymphdx.core.seeding import seeded_rng

__all__ = ["Augmenter", "IMAGE", "GRID_KEYS"]

IMAGE = "image"
GRID_KEYS = ("mask", "pseudo_mask", "pseudo_weight")  # label-like volumes on the image grid


class Augmenter:
    """Seeded MONAI augmentation of ``(D, H, W)`` volumes (the config's x/y/z axes are the
    arrays' last/middle/first).

    Args:
        cfg: the ``training.augmentation`` section.
    """

    def __init__(self, cfg: AugmentationConfig) -> None:
        self.cfg = cfg
        keys = (IMAGE, *GRID_KEYS)
        modes = ("bilinear", "nearest", "nearest", "nearest")
        angle = float(np.deg2rad(cfg.rotate_deg))
        spatial = [
            RandFlipd(keys, prob=0.5, spatial_axis=2 - axis, allow_missing_keys=True)
            for axis in cfg.flip_axes
        ]
        if cfg.spatial_prob > 0 and (angle > 0 or cfg.scale > 0):
            spatial.append(
                RandAffined(
                    keys,
                    prob=cfg.spatial_prob,
                    rotate_range=(angle, angle, angle),
                    scale_range=(cfg.scale, cfg.scale, cfg.scale),
                    mode=modes,
                    padding_mode="border",
                    allow_missing_keys=True,
                )
            )
        intensity = []
        if cfg.intensity_scale > 0:
            intensity.append(RandScaleIntensityd(IMAGE, factors=cfg.intensity_scale, prob=1.0))
        if cfg.intensity_shift > 0:
            intensity.append(RandShiftIntensityd(IMAGE, offsets=cfg.intensity_shift, prob=1.0))
        if cfg.noise_std > 0 and cfg.intensity_prob > 0:
            intensity.append(
                RandGaussianNoised(
                    IMAGE, prob=cfg.intensity_prob, std=cfg.noise_std, sample_std=True
                )
            )
        if cfg.intensity_prob > 0:
            s = tuple(cfg.blur_sigma)
            intensity.append(
                RandGaussianSmoothd(IMAGE, sigma_x=s, sigma_y=s, sigma_z=s, prob=cfg.intensity_prob)
            )
        if cfg.low_res_prob > 0:
            intensity.append(
                RandSimulateLowResolutiond(
                    IMAGE, prob=cfg.low_res_prob, zoom_range=tuple(cfg.low_res_zoom)
                )
            )
        if cfg.gamma_prob > 0:
            intensity.append(
                RandAdjustContrastd(IMAGE, prob=cfg.gamma_prob, gamma=tuple(cfg.gamma_range))
            )
        self.transform = Compose([*spatial, *intensity])

    def __call__(self, key: Sequence[int], volumes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Augment one scan's ``volumes`` (``image`` and any of ``GRID_KEYS``, each
        ``(D, H, W)``) with the draw seeded by ``key``; returns new arrays of the same
        shapes and dtypes (grid volumes keep their values, e.g. 0/1)."""
        self.transform.set_random_state(seed=int(seeded_rng(*key).integers(2**31 - 1)))
        data = {
            k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None]
            for k, v in volumes.items()
        }
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: no metadata to carry, a third faster
        try:
            out = self.transform(data)
        finally:
            set_track_meta(tracking)
        result = {}
        for k, v in volumes.items():
            a = out[k]
            a = a.as_tensor() if hasattr(a, "as_tensor") else a
            arr = np.asarray(a[0].detach().cpu().numpy())
            result[k] = arr.astype(v.dtype, copy=False) if k != IMAGE else arr.astype(np.float32)
        return result
