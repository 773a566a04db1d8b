"""One training step's forward pass and loss terms: the module DDP wraps (whole scans and
ROI patches in one call), the maps that the masks teach, and the weighted sum of the
classification, ROI and pseudo-label losses over the global batch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.strategies import Strategy
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.losses import RoiLoss, classification_loss
from lymphdx.engine.performance import autocast, prepare_input
from lymphdx.engine.propagation import PseudoLabels
from lymphdx.engine.run_folder import TrainingError
from lymphdx.engine.running_stats import PassContext
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import MultiTaskNet


def maps_and_targets(
    out: dict[str, torch.Tensor], suffix: str, items: slice, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The map logits that the ROI masks teach, stacked as one batch, with their targets:
    ``out["roi" + suffix][items]`` ``(b, 1, D, H, W)``, and the malignancy map's after it
    when the model has one (``2b`` items, ``targets`` ``(b, 1, D, H, W)`` repeated).
    Returns (logits, targets, number of maps)."""
    maps = [out["roi" + suffix]]
    if "malignancy" + suffix in out:
        maps.append(out["malignancy" + suffix])
    logits = torch.cat([m[items] for m in maps])
    return logits, torch.cat([targets] * len(maps)), len(maps)


class StepModule(torch.nn.Module):
    """One training step's forward passes as one module call, so that DDP sees a single
    forward: whole scans ``images`` ``(B, 1, D, H, W)`` (``MultiTaskNet.forward`` with
    ``roi``), or with ``sizes`` the tiles of B scans' bags (``MultiTaskNet.bags``), and,
    when given, ROI patches ``(P, 1, d, h, w)`` decoded under ``roi_patch``."""

    def __init__(
        self,
        model: MultiTaskNet,
        scan_context: PassContext | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # what the scans' pass runs in when patches follow (training.running_stats)
        self.scan_context = scan_context or (lambda m: contextlib.nullcontext())

    def forward(
        self,
        images: torch.Tensor | None,
        roi: bool | slice,
        patches: torch.Tensor | None = None,
        sizes: list[int] | None = None,
    ) -> dict[str, torch.Tensor]:
        passes = self.scan_context(self.model) if patches is not None else contextlib.nullcontext()
        with passes:
            if images is None:
                out = {}
            elif sizes is not None:  # scans as bags of tiles: MultiTaskNet.bags
                out = dict(self.model.bags(images, sizes))
            else:
                out = dict(self.model(images, roi=roi))
        if patches is not None:
            maps = self.model(patches, roi=True)
            out["roi_patch"] = maps["roi"]
            if "malignancy" in maps:
                out["malignancy_patch"] = maps["malignancy"]
        return out


class LossesMixin:
    """``Trainer``'s forward pass and loss terms of one step."""

    config: Config
    ctx: DistContext
    strategy: Strategy
    epoch: int
    run_dir: Path
    model: MultiTaskNet
    train_model: torch.nn.Module
    domain_bn: bool
    roi_loss: RoiLoss
    pseudo: PseudoLabels

    def _losses(
        self,
        step: int,
        weak: dict[str, Any] | None,
        strong: dict[str, Any] | None,
        patches: dict[str, Any] | None,
        sizes: tuple[int, int, int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass of this rank's blocks (weak and strong whole scans, strong ROI
        patches) and the loss terms of the global batch (``sizes``: its weak, strong and
        patch counts); returns ``(weighted total, terms)``."""
        ctx, device, tcfg = self.ctx, self.ctx.device, self.config.training
        n_weak, n_strong, n_patch = sizes
        nw = 0 if weak is None else len(weak["index"])
        parts = [b["image"] for b in (weak, strong) if b is not None]
        # training.sampler tiles: each scan a bag of tiles; the maps are per tile
        bagged = any(b is not None and "sizes" in b for b in (weak, strong))
        sizes = [n for b in (weak, strong) if b is not None for n in b.get("sizes", [])]
        nw_items = sum(weak["sizes"]) if bagged and weak is not None else nw
        pseudo_roi = weak is not None and "pseudo_mask" in weak
        strong_masks = strong is not None and "mask" in strong
        # decode only the scans with an ROI target (pseudo masks: weak; real masks: strong)
        roi: bool | slice = False
        if pseudo_roi and strong_masks:
            roi = True
        elif pseudo_roi:
            roi = slice(0, nw)
        elif strong_masks:
            roi = slice(nw, None)
        images = torch.cat(parts).to(device) if parts else None
        with contextlib.ExitStack() as routing:
            if self.domain_bn:  # weak scans in domain 0, strong in 1; the decoder sees roi
                n = 0 if images is None else len(images)
                ids = torch.tensor([WEAK] * nw + [STRONG] * (n - nw))
                routing.enter_context(domains(self.model, ids))
                # the decoder sees the sliced batch, unless the attention reads all of it
                if isinstance(roi, slice) and not self.model.classifier.attention:
                    routing.enter_context(domains(self.model.decoder, ids[roi]))
            with autocast(tcfg, device):
                out = self.train_model(
                    None if images is None else prepare_input(images, tcfg),
                    roi,
                    None if patches is None else prepare_input(patches["image"].to(device), tcfg),
                    sizes if bagged else None,
                )
        terms: dict[str, torch.Tensor] = {}
        if weak is not None:
            terms["cls"] = classification_loss(
                out["cls"][:nw], weak["labels"].to(device), total=n_weak, ctx=ctx
            )
        # with model.malignancy_map the masks teach both maps: one loss over both, as one
        # batch of twice the items (maps_and_targets)
        if patches is not None:
            logits, masks, m = maps_and_targets(
                out, "_patch", slice(None), patches["mask"].to(device)
            )
            terms["roi"] = self.roi_loss(logits, masks, total_items=m * n_patch, ctx=ctx)
        elif strong_masks:
            assert strong is not None
            logits, masks, m = maps_and_targets(
                out, "", slice(nw, None) if roi is True else slice(None), strong["mask"].to(device)
            )
            terms["roi"] = self.roi_loss(logits, masks, total_items=m * n_strong, ctx=ctx)
        pseudo = self.pseudo
        if (
            strong is not None
            and self.strategy.pseudo_cls_strong
            and pseudo.strong_targets is not None
            and pseudo.strong_weights is not None
        ):
            index = strong["index"]
            t = torch.from_numpy(pseudo.strong_targets[index]).to(device)
            w = torch.from_numpy(pseudo.strong_weights[index]).to(device)
            # graph weights (certainty x class weight) scale each scan's loss, averaged
            # over the batch (Iscen et al.); the paper's 0/1 weights select scans
            graph = self.config.propagation.method == "graph"
            if pseudo.strong_weights[strong["global"]].sum() > 0:
                terms["pseudo_cls"] = classification_loss(
                    out["cls"][nw:], t, w, total=n_strong, scale_items=graph, ctx=ctx
                )
        if pseudo_roi:
            assert weak is not None
            weak_roi, target, m = maps_and_targets(
                out, "", slice(0, nw_items), weak["pseudo_mask"].to(device)
            )
            weight = weak.get("pseudo_weight")  # voxel weights: ignore bands and gates
            terms["pseudo_roi"] = self.roi_loss(
                weak_roi,
                target,
                None if weight is None else torch.cat([weight.to(device)] * m),
                # bags: the global batch's weak tiles (this rank's block is its tiles)
                total_items=m * (sum(ctx.all_gather_object(nw_items)) if bagged else n_weak),
                ctx=ctx,
            )
        for k, v in terms.items():
            if not torch.isfinite(v):  # a global value: every rank stops here together
                who = [
                    f"{name} patients {b['patient_ids']}"
                    for name, b in (("weak", weak), ("strong", strong), ("ROI patch", patches))
                    if b
                ]
                raise TrainingError(
                    f"loss term {k!r} became {float(v.detach())} at epoch {self.epoch} step {step} "
                    f"({', '.join(who)}); stopped, the last good checkpoint is "
                    f"{self.run_dir / 'checkpoints'}"
                )
        weights = tcfg.loss
        total = sum(getattr(weights, k) * v for k, v in terms.items())
        assert isinstance(total, torch.Tensor)
        return total, terms
