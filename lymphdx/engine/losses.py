"""Losses of the paper (§3.2): BCE for the scan label, voxel-wise BCE + Dice for the ROI map.

Each loss is written once, as "sums, then combine": a term is built from sums over this
process's block of the global batch, ``ctx.global_sum`` adds them over the processes (the
identity in one process) and the combination runs on the global sums. The loss of a global
batch split over ranks is then the loss of the whole batch in one process, and one process
is the trivial case, not a second implementation.

A mean over items enters as this block's mean times its share of the global batch
(``n_block / n_global``, exactly 1 in one process). That keeps one process's value and
gradient bit for bit those of MONAI's ``DiceCELoss(sigmoid=True, batch=True)`` and of
``F.binary_cross_entropy_with_logits(reduction="mean")``, whose fused gradient differs in
the last bit from that of a sum divided by n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lymphdx.engine.distributed import DistContext

__all__ = ["classification_loss", "RoiLoss"]

_ONE_PROCESS = DistContext()


def _share(items: int, total: int | None) -> float:
    """A block of ``items`` items' share of a global batch of ``total`` (``None``: the block
    is the whole batch)."""
    return 1.0 if total is None else items / max(total, 1)


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    total: int | None = None,
    scale_items: bool = False,
    ctx: DistContext | None = None,
) -> torch.Tensor:
    """ℓ_C: binary cross-entropy on logits ``(b,)`` against (soft) targets ``(b,)`` in
    [0, 1], over the global batch of which these are this rank's ``b`` items.

    Without ``weights``, the mean over the batch's ``total`` items (default: this block).
    ``weights`` ``(b,)`` ≥ 0 select scans (e.g. 0 for a pseudo-label below the confidence
    cut-off): Σ w·ℓ / Σ w over all ranks. With ``scale_items`` they scale each scan's loss
    instead, averaged over the ``total`` items: Σ w·ℓ / n (Iscen et al.'s weighted
    pseudo-label loss). ``ctx``: the ranks holding the other blocks (default: one process).
    """
    gsum = (ctx or _ONE_PROCESS).global_sum
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    if weights is None:
        mean = loss.mean() if len(loss) else loss.sum()  # an empty block adds 0
        return gsum(mean * _share(len(loss), total))
    weighted = gsum((loss * weights).sum())
    if scale_items:
        return weighted / max(float(len(loss) if total is None else total), 1e-8)
    return weighted / gsum(weights.sum()).clamp_min(1e-8)


class RoiLoss(nn.Module):
    """ℓ_D: voxel-wise binary cross-entropy plus soft Dice on logits ``(b, C, D, H, W)``.

    Dice is computed over the whole batch (MONAI's ``batch=True``), so that scans without
    any node (a negative pseudo mask) do not each contribute an undefined 0/0 Dice:

        BCE  = Σ w·bce(x, t) / Σ w
        Dice = 1 − (2 tp + smooth_nr) / (2 (tp + fp/2 + fn/2) + smooth_dr),  p = σ(x),
        tp = Σ w·p·t,  fp = Σ w·p − tp,  fn = Σ w·t − tp

    summed over batch and space per channel, Dice then averaged over channels (MONAI's
    arithmetic, so that its rounding is kept too). Without
    voxel ``weights`` w = 1 and this is MONAI's ``DiceCELoss(sigmoid=True, batch=True)``
    (tested against it). A voxel of weight 0 counts nowhere and gets an exactly-zero
    gradient; all weights 0 give a loss of 0. Computed in float32.
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.lambda_dice, self.lambda_ce = lambda_dice, lambda_ce
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        total_items: int | None = None,
        ctx: DistContext | None = None,
    ) -> torch.Tensor:
        """The loss of the global batch of ``total_items`` scans (default: this block)
        from this rank's ``b`` items; ``targets`` (and ``weights``) shaped as ``logits``."""
        shapes = [tuple(t.shape) for t in (logits, targets, weights) if t is not None]
        if len(set(shapes)) > 1:
            raise ValueError(f"logits, targets and weights must have the same shape, got {shapes}")
        gsum = (ctx or _ONE_PROCESS).global_sum
        x, t = logits.float(), targets.float()
        p = torch.sigmoid(x)
        dims = [0, *range(2, x.dim())]
        if weights is None:
            mean = F.binary_cross_entropy_with_logits(x, t) if x.numel() else x.sum()
            ce = gsum(mean * _share(len(x), total_items))
            sums = [(p * t).sum(dims), p.sum(dims), t.sum(dims)]
        else:
            w = weights.float()
            bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
            weighted, weight = gsum(torch.stack([(bce * w).sum(), w.sum()])).unbind()
            ce = weighted / weight.clamp_min(1e-8)
            sums = [(w * p * t).sum(dims), (w * p).sum(dims), (w * t).sum(dims)]
        tp, predicted, true = gsum(torch.stack(sums)).unbind()
        fp, fn = (predicted - tp) * 0.5, (true - tp) * 0.5
        dice = 1 - (2 * tp + self.smooth_nr) / (2 * (tp + fp + fn) + self.smooth_dr)
        return self.lambda_dice * dice.mean() + self.lambda_ce * ce
