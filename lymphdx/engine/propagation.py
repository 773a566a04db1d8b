"""Label propagation between the two sets (paper §3.2).

The current model (or its EMA teacher) labels the other set's training volumes:
    strong set: ỹ = σ(f(v))            → pseudo class labels (hard or soft, with weights)
    weak set:   s̃_ζ = [g(f(v)) > ζ]    → pseudo ROI masks
Options beyond the paper (``PropagationConfig``; all off by default, the paper's method):
    method graph      ỹ by label propagation over a k-NN graph of pooled embeddings of
                      the weak (labelled) and strong (unlabelled) training scans
    tta_flip          predictions averaged over the scan and its left-right flip
    curriculum        only the most confident share of ỹ, growing each round
    roi_ignore_low,   voxel weights of s̃_ζ: 0 in the unsure band [low, ζ], and 0 on every
    roi_cls_gate      voxel of a scan the classifier calls negative
A model with domain-specific batch norm sees each set in its own domain (``domain``:
``WEAK`` = 0, ``STRONG`` = 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lymphdx.core.config import Config, PropagationConfig
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.strategies import Strategy
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.graph_propagation import graph_label_propagation, pseudo_labels_for
from lymphdx.engine.inferer import Inferer, WholeInferer
from lymphdx.engine.pseudo_masks import curriculum_keep, pseudo_mask_targets
from lymphdx.engine.pseudo_store import read_round, write_round
from lymphdx.models.domain_norm import domains

log = logging.getLogger("lymphdx")

__all__ = [
    "PropagationMixin",
    "predict_volumes",
    "PseudoLabels",
    "pseudo_labels",
    "propagate_labels_graph",
    "propagate_mask_targets",
    "is_propagation_epoch",
    "propagation_round",
]


# this rank's block of masks (and weights) -> every scan's, e.g. from RUN/pseudo/
MaskStore = Callable[
    [list[np.ndarray], list[np.ndarray] | None], tuple[list[np.ndarray], list[np.ndarray] | None]
]


@dataclass
class PseudoLabels:
    """Propagated labels. ``strong_targets``/``strong_weights`` ``(N_strong,)`` float32;
    ``weak_masks`` ``(N_weak, D, H, W)`` uint8 and, with an ignore band or a classifier
    gate, ``weak_mask_weights`` of the same shape, uint8 0/1 (voxels of weight 0 count
    nowhere in the pseudo ROI loss); under ``data.fit: whole`` lists of each scan's
    ``(D, H, W)``, memory-mapped from ``RUN/pseudo/<weak_store>/`` (``engine.pseudo_store``);
    any may be None."""

    strong_targets: np.ndarray | None = None
    strong_weights: np.ndarray | None = None
    weak_masks: np.ndarray | list[np.ndarray] | None = None
    epoch: int = -1
    weak_mask_weights: np.ndarray | list[np.ndarray] | None = None
    weak_store: str | None = None  # RUN/pseudo/'s round that holds the lists

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.strong_targets is not None and self.strong_weights is not None:
            kept = self.strong_weights > 0
            out["pseudo_pos_fraction"] = (
                float(self.strong_targets[kept].mean()) if kept.any() else 0.0
            )
            out["pseudo_kept_fraction"] = float(kept.mean())
            out["pseudo_weight_mean"] = float(self.strong_weights.mean())
        if self.weak_masks is not None and len(self.weak_masks):
            on = sum(int(np.count_nonzero(m)) for m in self.weak_masks)
            out["pseudo_mask_voxel_fraction"] = on / sum(m.size for m in self.weak_masks)
            out["pseudo_mask_nonempty"] = float(np.mean([m.any() for m in self.weak_masks]))
        if self.weak_mask_weights is not None and len(self.weak_mask_weights):
            kept = sum(float(w.sum()) for w in self.weak_mask_weights)
            out["pseudo_mask_weighted_fraction"] = kept / sum(
                w.size for w in self.weak_mask_weights
            )
        return out


def is_propagation_epoch(epoch: int, cfg: PropagationConfig, start: int | None = None) -> bool:
    """Propagation runs at the start of epoch ``start`` (default ``warmup_epochs``; later
    when a Dice gate held it back), then every ``every`` epochs."""
    start = cfg.warmup_epochs if start is None else start
    return epoch >= start and (epoch - start) % cfg.every == 0


def propagation_round(epoch: int, cfg: PropagationConfig, start: int | None = None) -> int:
    """The index of the propagation round at propagation epoch ``epoch``: how many rounds
    ran before it (0 at the first, at ``start``, default ``warmup_epochs``)."""
    start = cfg.warmup_epochs if start is None else start
    return max(0, (epoch - start) // cfg.every)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _my_batches(
    model: torch.nn.Module, volumes: VolumeSet, batch_size: int, ctx: DistContext, domain: int
) -> Iterator[torch.Tensor]:
    """This rank's block of ``volumes`` (``ctx.shard``) in batches ``(B, 1, D, H, W)`` on
    the model's device, with ``domain``'s normalisation selected while they are used."""
    device = _device(model)
    index = ctx.shard(range(len(volumes)))
    with domains(model, domain):
        for start in range(0, len(index), batch_size):
            yield volumes.batch(index[start : start + batch_size]).images.to(device)


@torch.no_grad()
def predict_volumes(
    model: torch.nn.Module,
    volumes: VolumeSet,
    output: Literal["probability", "embedding"] = "probability",
    batch_size: int = 4,
    ctx: DistContext | None = None,
    domain: int = WEAK,
    tta: bool = False,
    inferer: Inferer | None = None,
) -> np.ndarray:
    """Every volume's σ(f(v)), ``(N,)`` float32, or with ``output="embedding"`` the
    classifier's pooled embedding, ``(N, C)`` float32 (what σ's fully connected layers
    see), scored by ``inferer`` (default ``WholeInferer``) with the model in eval mode
    (restored after).

    With a distributed ``ctx`` each rank predicts its block of the volumes and every rank
    gets all ``N`` results, in order. ``tta``: averaged with the left-right flip's.
    """
    ctx = ctx or DistContext()
    inferer = inferer or WholeInferer()
    embed = output == "embedding"
    out = [np.zeros((0, model.classifier.fc1.in_features) if embed else 0, dtype=np.float32)]
    was_training = model.training
    model.eval()
    try:
        for images in _my_batches(model, volumes, inferer.batch_size(batch_size), ctx, domain):
            if embed:
                out.append(inferer.embed(model, images, flips=tta).cpu().numpy())
            else:
                cls = inferer(model, images, roi=False, flips=tta)["cls"]
                out.append(cls.cpu().numpy())
    finally:
        model.train(was_training)
    return ctx.all_gather_array(np.concatenate(out))


def _curriculum(
    weights: np.ndarray, confidence: np.ndarray, cfg: PropagationConfig, round_index: int
) -> np.ndarray:
    """``weights`` with those outside the curriculum's most confident share set to 0."""
    if not cfg.curriculum:
        return weights
    keep = curriculum_keep(confidence, round_index, cfg.curriculum_start, cfg.curriculum_step)
    return np.where(keep, weights, 0.0).astype(np.float32)


def prevalence_shift(p: np.ndarray, prevalence: float) -> np.ndarray:
    """Probabilities ``(N,)`` shifted in logit space, σ(logit(p) − logit(q)), with q the
    ``1 − prevalence`` quantile of ``p``: the top ``prevalence`` share then lies above 0.5
    and the order of the scans is kept."""
    eps = 1e-6
    logit = np.log(np.clip(p, eps, 1 - eps)) - np.log1p(-np.clip(p, eps, 1 - eps))
    cut = float(np.quantile(logit, 1.0 - float(np.clip(prevalence, 0.0, 1.0))))
    return (1.0 / (1.0 + np.exp(-(logit - cut)))).astype(np.float32)


def pseudo_labels(
    p: np.ndarray,
    cfg: PropagationConfig,
    round_index: int = 0,
    prevalence: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo class labels from the classifier's probabilities ``p`` ``(N,)`` σ(f(v)) of
    the unlabelled scans (``predict_volumes``).

    Returns ``(targets, weights)``, both ``(N,)``: hard (p > 0.5) or soft (p) targets, and
    weight 1 where the confidence |2p − 1| reaches ``cfg.confidence``, else 0; with
    ``cfg.curriculum`` only the most confident share of round ``round_index`` keeps it.
    ``cfg.threshold`` "prevalence": p is first ``prevalence_shift``ed to ``prevalence``
    (the labelled set's share of positives).
    """
    p = np.asarray(p).astype(np.float32)
    if cfg.threshold == "prevalence":
        if prevalence is None:
            raise ValueError("propagation.threshold 'prevalence' needs the labelled prevalence")
        p = prevalence_shift(p, prevalence)
    targets = (p > 0.5).astype(np.float32) if cfg.pseudo_labels == "hard" else p
    confidence = np.abs(2 * p - 1)
    weights = (confidence >= cfg.confidence).astype(np.float32)
    return targets, _curriculum(weights, confidence, cfg, round_index)


@torch.no_grad()
def propagate_labels_graph(
    model: torch.nn.Module,
    labelled: VolumeSet,
    unlabelled: VolumeSet,
    cfg: PropagationConfig,
    batch_size: int = 4,
    ctx: DistContext | None = None,
    round_index: int = 0,
    inferer: Inferer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo class labels for ``unlabelled`` (the strong set) by graph label propagation
    (Iscen et al. 2019) from the true labels of ``labelled`` (the weak training set).

    The nodes are the pooled embeddings (``predict_volumes(..., "embedding")``) of both
    sets, each in its own domain, scored by ``inferer``; ``k`` is ``cfg.graph_k`` capped at
    the node count − 1. Returns
    ``(targets, weights)`` ``(N_unlabelled,)`` float32: ``probs[:, 1]`` (soft) or the
    argmax (hard), and weight = ω / max ω (the certainty relative to the surest of all
    nodes, as Iscen et al.'s code) × class weight ζ, times the ``cfg.confidence`` cut on
    |2·probs[:, 1] − 1| and the curriculum (ranked by certainty). Every rank
    solves the propagation from the gathered embeddings; rank 0's result is used.
    """
    ctx = ctx or DistContext()
    tta = cfg.tta_flip
    weak = predict_volumes(model, labelled, "embedding", batch_size, ctx, WEAK, tta, inferer)
    strong = predict_volumes(model, unlabelled, "embedding", batch_size, ctx, STRONG, tta, inferer)
    labels = labelled.labels
    assert labels is not None, "the labelled set must be a weak (labelled) set"
    embeddings = np.concatenate([weak, strong]).astype(np.float64)
    all_labels = np.concatenate([labels, np.full(len(strong), -1, dtype=np.int64)])
    result = graph_label_propagation(
        embeddings,
        all_labels,
        n_classes=2,
        k=min(cfg.graph_k, len(embeddings) - 1),
        gamma=cfg.graph_gamma,
        alpha=cfg.graph_alpha,
    )
    index = np.arange(len(weak), len(embeddings))
    targets, weights = pseudo_labels_for(result, index, soft=cfg.pseudo_labels == "soft")
    # certainty relative to the surest node, as the authors' code (LP-DeepSSL) does: an
    # early embedding spreads the labels almost uniformly (ω ~ 1e-4 everywhere), and the
    # item-scaled loss would then ignore the pseudo-labels however they rank
    top = float(result.certainty.max())
    weights = weights / top if top > 0 else weights
    p1 = result.probs[index, 1]
    weights = np.where(np.abs(2 * p1 - 1) >= cfg.confidence, weights, 0.0).astype(np.float32)
    weights = _curriculum(weights, result.certainty[index], cfg, round_index)
    # rank 0's solution on every rank, in case another node's BLAS rounds differently
    return ctx.broadcast_object((targets, weights))


@torch.no_grad()
def propagate_mask_targets(
    model: torch.nn.Module,
    volumes: VolumeSet,
    cfg: PropagationConfig,
    batch_size: int = 4,
    ctx: DistContext | None = None,
    domain: int = WEAK,
    inferer: Inferer | None = None,
    store: MaskStore | None = None,
) -> tuple[Any, Any]:
    """Pseudo ROI masks ``(N, D, H, W)`` uint8, g(f(v)) > ζ (``cfg.roi_threshold``), and
    their voxel weights (uint8 0/1, same shape) when ``cfg.roi_ignore_low`` or
    ``cfg.roi_cls_gate`` is set, else None (every voxel counts); the maps are ``inferer``'s
    (default ``WholeInferer``).

    With a distributed ``ctx`` each rank decodes its block and every rank gets all masks.
    Under ``data.fit: whole`` (scans of their own sizes) both are lists of ``(D, H, W)``;
    with ``store`` (``Trainer``: ``RUN/pseudo/``) each rank hands its block to it and gets
    back every scan's masks, e.g. memory-mapped, instead of gathering them.
    """
    ctx = ctx or DistContext()
    inferer = inferer or WholeInferer()
    weighted = cfg.roi_ignore_low is not None or cfg.roi_cls_gate is not None
    masks: list[np.ndarray] = []  # (D, H, W) per scan of this rank's block
    weights: list[np.ndarray] = []
    gate = cfg.roi_cls_gate
    for images in _my_batches(model, volumes, inferer.batch_size(batch_size), ctx, domain):
        out = inferer(model, images, roi=True, flips=cfg.tta_flip)
        target, weight = pseudo_mask_targets(
            out["roi"][:, 0],
            cfg.roi_threshold,
            cfg.roi_ignore_low,
            out["cls"] if gate is not None else None,
            gate,
        )
        masks.extend(target.cpu().numpy())
        if weighted:
            weights.extend(weight.to(torch.uint8).cpu().numpy())
    if volumes.cache.cfg.shape is None:  # data.fit whole: scans of their own sizes
        if store is not None:
            return store(masks, weights if weighted else None)
        all_masks: np.ndarray | list[np.ndarray] = _gather_list(ctx, masks)
        return all_masks, _gather_list(ctx, weights) if weighted else None
    empty = np.zeros((0, *volumes.shape), dtype=np.uint8)

    def stacked(arrays: list[np.ndarray]) -> np.ndarray:
        return ctx.all_gather_array(np.stack(arrays) if arrays else empty)

    return stacked(masks), stacked(weights) if weighted else None


def _gather_list(ctx: DistContext, local: list[np.ndarray]) -> list[np.ndarray]:
    """Every rank's list of arrays, concatenated in rank order (``ctx.shard``'s order)."""
    return [a for part in ctx.all_gather_object(local) for a in part]


class PropagationMixin:
    """``Trainer``'s propagation: when it is due (``propagation_due``, a hook) and one
    round of pseudo class labels for the strong set and pseudo ROI masks for the weak set
    (``propagation``, a hook), made by the teacher."""

    config: Config
    ctx: DistContext
    strategy: Strategy
    epoch: int
    roi_warmup: int
    history: list[dict[str, Any]]
    pseudo: PseudoLabels
    propagation_start: int | None
    propagation_note: str
    weak_train: VolumeSet
    strong_train: VolumeSet | None
    teacher: torch.nn.Module
    run_dir: Path
    inferer: Inferer
    gate_reading: dict[str, float]

    def strong_fit_dice(self, model: torch.nn.Module) -> tuple[float, int]: ...

    # -- the named steps ---------------------------------------------------------------
    def propagation_due(self) -> bool:
        """Whether this epoch starts with a propagation; sets ``propagation_note`` to why
        (not). The first waits for ``propagation.warmup_epochs`` (and the ROI warm-up),
        and, with ``propagation.dice_gate``, for the decoder: the teacher's Dice on all
        strong training + validation scans must reach the gate (``gate_reading`` holds
        it for the history)."""
        cfg = self.config.propagation
        self.propagation_note = ""
        self.gate_reading = {}
        if not self.strategy.propagates:
            return False
        if self.propagation_start is not None:
            return is_propagation_epoch(self.epoch, cfg, self.propagation_start)
        first = max(cfg.warmup_epochs, self.roi_warmup)
        if self.epoch < first:
            self.propagation_note = f"warm-up until epoch {first}"
            return False
        gate = cfg.dice_gate if self.strategy.roi_strong else None
        if gate is None:
            self.propagation_note = f"started at epoch {first} (propagation.warmup_epochs)"
        else:
            # the teacher's decoder (it makes the pseudo masks) on all strong training +
            # validation scans: the validation split's few patients swing too much for a
            # switch (BENCHMARKS.md); recorded in the history
            dice, n = self.strong_fit_dice(self.teacher)
            self.gate_reading = {"gate_dice": dice, "gate_scans": n}
            what = f"Dice on {n} strong training + validation scans"
            if dice < gate:
                self.propagation_note = f"waiting: {what} {dice:.3f} < gate {gate:g}"
                return False
            self.propagation_note = f"started: {what} {dice:.3f} >= gate {gate:g}"
        self.propagation_start = self.epoch
        log.info("epoch %d: propagation %s", self.epoch, self.propagation_note)
        return True

    def _store_weak_masks(
        self, masks: list[np.ndarray], weights: list[np.ndarray] | None
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Scans of their own sizes: this rank's block of the round's masks goes to
        ``RUN/pseudo/`` (``pseudo_store``), and every rank reads all of them back
        memory-mapped."""
        name = write_round(self.run_dir, self.epoch, masks, weights, self.ctx)
        self.pseudo.weak_store = name
        return read_round(self.run_dir, name)

    def propagation(self) -> None:
        cfg, ctx = self.config.propagation, self.ctx
        teacher = self.teacher
        round_index = propagation_round(self.epoch, cfg, self.propagation_start)
        if self.strategy.pseudo_cls_strong:
            assert self.strong_train is not None
            if cfg.method == "graph":
                targets, weights = propagate_labels_graph(
                    teacher,
                    self.weak_train,
                    self.strong_train,
                    cfg,
                    ctx=ctx,
                    round_index=round_index,
                    inferer=self.inferer,
                )
            else:
                p = predict_volumes(
                    teacher,
                    self.strong_train,
                    ctx=ctx,
                    domain=STRONG,
                    tta=cfg.tta_flip,
                    inferer=self.inferer,
                )
                prevalence = float(np.mean(self.weak_train.labels))
                targets, weights = pseudo_labels(p, cfg, round_index, prevalence)
            if self._one_class(targets, weights) and cfg.skip_one_class:
                weights = np.zeros_like(weights)
            self.pseudo.strong_targets, self.pseudo.strong_weights = targets, weights
        if self.strategy.pseudo_roi_weak:
            self.pseudo.weak_masks, self.pseudo.weak_mask_weights = propagate_mask_targets(
                teacher,
                self.weak_train,
                cfg,
                ctx=ctx,
                domain=WEAK,
                inferer=self.inferer,
                store=self._store_weak_masks,
            )
            if not any(m.any() for m in self.pseudo.weak_masks):
                note = (
                    f"every pseudo ROI mask is empty (no voxel above ζ = {cfg.roi_threshold:g}): "
                    "the pseudo ROI loss teaches 'no node' everywhere"
                )
                log.warning("epoch %d propagation: %s", self.epoch, note)
                self.propagation_note = "; ".join(filter(None, [self.propagation_note, note]))
        self.pseudo.epoch = self.epoch
        log.info("epoch %d propagation: %s", self.epoch, self.pseudo.summary())

    def _one_class(self, targets: np.ndarray, weights: np.ndarray) -> bool:
        """Whether every kept pseudo class label ``(N_strong,)`` falls on one side of 0.5
        (typically a classifier still at chance on the other hospital); if so, warn in
        ``train.log`` and ``propagation_note``, saying whether the round's pseudo class
        loss is skipped (``propagation.skip_one_class``) or teaches that one class."""
        kept = targets[weights > 0]
        if kept.size < 2 or 0 < int((kept > 0.5).sum()) < kept.size:
            return False
        side = "positive" if bool(kept[0] > 0.5) else "negative"
        what = (
            "this round's pseudo class loss is skipped (propagation.skip_one_class)"
            if self.config.propagation.skip_one_class
            else "the pseudo class loss teaches one class"
        )
        note = f"every pseudo class label is {side} ({kept.size} strong scans): {what}"
        log.warning("epoch %d propagation: %s", self.epoch, note)
        self.propagation_note = "; ".join(filter(None, [self.propagation_note, note]))
        return True
