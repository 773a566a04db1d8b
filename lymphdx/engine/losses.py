"""Losses of the paper (§3.2): BCE for the scan label, voxel-wise CE + Dice for the ROI map."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

__all__ = ["classification_loss", "RoiLoss"]


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """ℓ_C: binary cross-entropy on logits ``(B,)`` against (soft) targets ``(B,)`` in [0, 1].

    ``weights`` ``(B,)`` weight each scan (e.g. 0 for a pseudo-label below the confidence
    cut-off); the mean is over the weights' sum.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / weights.sum().clamp_min(1e-8)


class RoiLoss(nn.Module):
    """ℓ_D: voxel-wise binary cross-entropy plus soft Dice on logits ``(B, 1, D, H, W)``.

    Dice is computed over the whole batch (``batch=True``) so that scans without any node
    (a negative pseudo-mask) do not each contribute an undefined 0/0 Dice.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0) -> None:
        super().__init__()
        self.loss = DiceCELoss(
            sigmoid=True, batch=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce
        )

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, masks.float())
