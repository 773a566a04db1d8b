"""Label propagation between the two sets (paper §3.2).

The current model labels the other set's training volumes:
    strong set: ỹ = σ(f(v))            → pseudo class labels (hard or soft, with weights)
    weak set:   s̃_ζ = [g(f(v)) > ζ]    → pseudo ROI masks
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lymphdx.config import PropagationConfig
from lymphdx.data.datasets import VolumeSet

__all__ = [
    "predict_probabilities",
    "PseudoLabels",
    "propagate_labels",
    "propagate_masks",
    "is_propagation_epoch",
]


@dataclass
class PseudoLabels:
    """Propagated labels. ``strong_targets``/``strong_weights`` ``(N_strong,)`` float32;
    ``weak_masks`` ``(N_weak, D, H, W)`` uint8; either may be None."""

    strong_targets: np.ndarray | None = None
    strong_weights: np.ndarray | None = None
    weak_masks: np.ndarray | None = None
    epoch: int = -1

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.strong_targets is not None and self.strong_weights is not None:
            kept = self.strong_weights > 0
            out["pseudo_pos_fraction"] = (
                float(self.strong_targets[kept].mean()) if kept.any() else 0.0
            )
            out["pseudo_kept_fraction"] = float(kept.mean())
        if self.weak_masks is not None:
            out["pseudo_mask_voxel_fraction"] = float(self.weak_masks.mean())
            out["pseudo_mask_nonempty"] = float(
                (self.weak_masks.reshape(len(self.weak_masks), -1).max(1) > 0).mean()
            )
        return out


def is_propagation_epoch(epoch: int, cfg: PropagationConfig) -> bool:
    """Propagation runs at the start of epoch ``warmup``, then every ``every`` epochs."""
    return epoch >= cfg.warmup_epochs and (epoch - cfg.warmup_epochs) % cfg.every == 0


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, volumes: VolumeSet, batch_size: int = 4
) -> np.ndarray:
    """σ(f(v)) for every volume, ``(N,)``, with the model in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(volumes), batch_size):
        batch = volumes.batch(range(start, min(start + batch_size, len(volumes))))
        out.append(torch.sigmoid(model(batch.images, roi=False)["cls"]).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def propagate_labels(
    model: torch.nn.Module, volumes: VolumeSet, cfg: PropagationConfig, batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo class labels for ``volumes`` from σ(f(v)).

    Returns ``(targets, weights)``, both ``(N,)``: hard (p > 0.5) or soft (p) targets, and
    weight 1 where the confidence |2p − 1| reaches ``cfg.confidence``, else 0.
    """
    p = predict_probabilities(model, volumes, batch_size).astype(np.float32)
    targets = (p > 0.5).astype(np.float32) if cfg.pseudo_labels == "hard" else p
    weights = (np.abs(2 * p - 1) >= cfg.confidence).astype(np.float32)
    return targets, weights


@torch.no_grad()
def propagate_masks(
    model: torch.nn.Module, volumes: VolumeSet, cfg: PropagationConfig, batch_size: int = 4
) -> np.ndarray:
    """Pseudo ROI masks ``(N, D, H, W)`` uint8: g(f(v)) > ζ (``cfg.roi_threshold``)."""
    was_training = model.training
    model.eval()
    masks = []
    for start in range(0, len(volumes), batch_size):
        batch = volumes.batch(range(start, min(start + batch_size, len(volumes))))
        prob = torch.sigmoid(model(batch.images, roi=True)["roi"])[:, 0]
        masks.append((prob > cfg.roi_threshold).to(torch.uint8).numpy())
    model.train(was_training)
    return np.concatenate(masks)
