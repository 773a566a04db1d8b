"""One trainer for the four strategies (a strategy is a row of flags, see ``strategies``).

The loop, in named steps (paper §3.2):
    for each epoch:
        propagation (when due): pseudo class labels for the strong set, pseudo ROI masks
            for the weak set, from the current model;
        joint training on real + propagated labels, batches drawn from both sets as the
            strategy needs;
        validation on the weak set's validation split (AUC, BCE) → model selection;
        history row, TensorBoard scalars, checkpoints ``last`` and (if better) ``best``.
Everything random depends only on (seed, epoch, step), so ``--resume`` from ``last``
replays the same run.

The named steps are ``Trainer``'s methods, the hooks a subclass (or a test) overrides:
``propagation_due`` and ``propagation`` (``propagation.PropagationMixin``),
``epoch_batches`` (``batches.BatchesMixin``), ``train_step`` (its forward pass and loss
terms in ``steps.LossesMixin``), ``validate`` and ``epoch_end`` (the choice of ``best``
in ``selection.SelectionMixin``). ``train.train`` opens the run folder and runs it.

Options beyond the paper (config; all off by default): an EMA teacher updated after every
optimiser step that labels the other set (``propagation.teacher``) and may be the
selected model; graph label propagation, a curriculum and weighted pseudo masks
(``propagation``); domain-specific batch norm (``model.norm: domain_batch``: weak scans
in domain 0, strong in 1); and the choice of the weights in ``best`` (``training.selection``:
best validation AUC of the student or of the EMA, SWA of the last epochs, or the last
epoch; see ``selection``).

Under ``torchrun`` the same loop runs on every rank (see ``distributed``): each rank
trains on its block of every global batch, propagation and validation are split across
the ranks and gathered, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import lymphdx
from lymphdx.core.config import Config, dump_config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.core.strategies import Strategy, get_strategy
from lymphdx.data.augment import Augmenter
from lymphdx.engine import selection
from lymphdx.engine.bag_sampler import BagSampler
from lymphdx.engine.batches import BatchesMixin
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import Inferer, make_inferer
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.lr_schedule import set_epoch_lr
from lymphdx.engine.performance import grad_scaler, optimizer_step
from lymphdx.engine.propagation import PropagationMixin, PseudoLabels, predict_volumes
from lymphdx.engine.pseudo_store import prune as prune_pseudo
from lymphdx.engine.roi_status import strong_dice, write_roi_status
from lymphdx.engine.run_data import RunData
from lymphdx.engine.run_folder import (
    checkpoint_path,
    load_checkpoint,
    pseudo_from_state,
    pseudo_to_state,
    read_history,
    run_fingerprint,
    save_checkpoint,
    verify_checkpoint,
    write_history,
)
from lymphdx.engine.running_stats import scan_pass_context
from lymphdx.engine.selection import SelectionMixin
from lymphdx.engine.steps import LossesMixin, StepModule
from lymphdx.engine.teacher import EmaTeacher, SwaAverager
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import MultiTaskNet, build_model
from lymphdx.stats.metrics import auc as compute_auc
from lymphdx.stats.metrics import binary_log_loss

__all__ = ["Trainer"]

log = logging.getLogger("lymphdx")


class Trainer(BatchesMixin, LossesMixin, PropagationMixin, SelectionMixin):
    """State of one training run; ``run()`` is the loop of the module docstring."""

    def __init__(
        self, config: Config, run_dir: Path, data: RunData, ctx: DistContext | None = None
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.data = data
        self.ctx = ctx or DistContext()
        self.strategy: Strategy = get_strategy(config.strategy)
        # how validation and propagation score a scan (evaluation.inferer)
        self.inferer: Inferer = make_inferer(config)
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        # the decoder learns from masks, or from scan labels through the attention pooling
        self.decoder_trained = self.strategy.trains_decoder or model.classifier.attention
        if not self.decoder_trained:  # it never gets a gradient; DDP must know
            model.decoder.requires_grad_(False)
        elif not self.strategy.trains_decoder and model.decoder.attention_head is not None:
            model.decoder.head[-1].requires_grad_(False)  # the ROI map's conv: masks only
        model = model.to(self.ctx.device)
        self.domain_bn = config.model.norm == "domain_batch"
        if self.ctx.is_distributed and self.ctx.device.type == "cuda" and not self.domain_bn:
            # batch statistics over the global batch; SyncBatchNorm runs on GPUs only, so
            # on CPU each rank normalises its block by its own statistics. Not with DSBN:
            # a rank without scans of a domain would skip that domain's collective.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        tcfg = config.training
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.model: MultiTaskNet = model  # the bare module: checkpoints, propagation, validation
        # ROI warm-up epochs give the classifier no gradient
        self.roi_warmup = config.training.roi_warmup_epochs if self.strategy.roi_strong else 0
        # what train_step calls: DDP when distributed, compiled when configured
        patch_pass = tcfg.roi_patch is not None and self.strategy.roi_strong
        scan_pass = scan_pass_context(tcfg.running_stats, patch_pass)
        self.train_model = self.ctx.wrap(
            StepModule(self.model, scan_pass), find_unused=self.domain_bn or self.roi_warmup > 0
        )
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model, dynamic=False)
        self.scaler = grad_scaler(tcfg, self.ctx.device)
        optimizer = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(
            self.model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay
        )
        self.augmenter = Augmenter(tcfg.augmentation) if tcfg.augmentation.enabled else None
        self.bag_augmenter = self.augmenter  # the bags' tiles (training.bag_augmentation)
        if tcfg.bag_augmentation is not None:
            bag_cfg = tcfg.bag_augmentation
            self.bag_augmenter = Augmenter(bag_cfg) if bag_cfg.enabled else None
        self._foreground: dict[int, np.ndarray] = {}  # strong training scan -> node voxels
        self.roi_loss = RoiLoss()
        self.weak_train = data.volumes("weak", "train")
        self.weak_val = data.volumes("weak", "val")
        self.strong_train = (
            data.volumes("strong", "train", masks=self.strategy.roi_strong)
            if self.strategy.uses_strong
            else None
        )
        # scans as bags of tiles (training.sampler: tiles), refreshed by refresh_bags
        self.bags = BagSampler(config) if tcfg.sampler == "tiles" else None
        self.patch: tuple[int, ...] | None = None  # (d, h, w)
        if tcfg.roi_patch is not None and self.bags is not None:  # scans of any size
            self.patch = tuple(reversed(tcfg.roi_patch))
        elif tcfg.roi_patch is not None:  # cut to the volumes' grid
            shape = self.weak_train.shape
            self.patch = tuple(
                min(p, s) for p, s in zip(reversed(tcfg.roi_patch), shape, strict=True)
            )
        self.strong_val = (
            data.volumes("strong", "val", masks=True) if self.strategy.roi_strong else None
        )
        self.pseudo = PseudoLabels()
        self.propagation_start: int | None = None  # the epoch of the first propagation
        self.propagation_note = ""  # why propagation did (not) run this epoch
        self.gate_reading: dict[str, float] = {}  # what the Dice gate read this epoch
        self.steps_done = 0  # optimiser steps so far
        self.epoch = 0
        self.best: dict[str, float] = {"val_auc": -1.0, "val_loss": math.inf, "epoch": -1}
        self.history: list[dict[str, Any]] = []
        self.val_predictions: list[dict[str, Any]] = []  # one row per epoch and patient
        # the mean teacher: it labels the other set and/or is the selected model
        self.ema = (
            EmaTeacher(self.model, tcfg.ema_decay)
            if config.propagation.teacher == "ema" or tcfg.selection in ("ema", "ema_last")
            else None
        )
        self.swa: SwaAverager | None = None  # built at the first epoch of its window
        self.swa_first = -1  # the first epoch in the SWA average
        self._check_blocks()
        first = max(config.propagation.warmup_epochs, self.roi_warmup)
        if self.strategy.propagates and tcfg.epochs <= first:
            log.warning(
                "%s trains %d epochs but propagation starts at epoch %d at the earliest "
                "(propagation.warmup_epochs, training.roi_warmup_epochs): it will never "
                "propagate, i.e. train as %s",
                config.strategy,
                tcfg.epochs,
                first,
                "multitask" if self.strategy.roi_strong else "supervised",
            )
        if self.domain_bn:
            per_rank = min(tcfg.batch_size, tcfg.strong_batch_size) // self.ctx.world_size
            if per_rank < 2:
                log.warning(
                    "model.norm domain_batch with %d scan(s) of a domain per process and step: "
                    "a domain with fewer than 2 scans in a batch is normalised with its running "
                    "statistics and does not update them",
                    per_rank,
                )

    @property
    def selected_model(self) -> MultiTaskNet:
        """The model that validation scores and ``best`` holds (until SWA at the end)."""
        if self.config.training.selection in ("ema", "ema_last"):
            assert self.ema is not None
            return self.ema.module  # type: ignore[return-value]
        return self.model

    @property
    def teacher(self) -> MultiTaskNet:
        """The model that makes the pseudo-labels (``propagation.teacher``)."""
        if self.config.propagation.teacher == "ema":
            assert self.ema is not None
            return self.ema.module  # type: ignore[return-value]
        return self.model

    def _check_blocks(self) -> None:
        """Every rank needs at least one scan of every global batch."""
        world, tcfg = self.ctx.world_size, self.config.training
        if world == 1:
            return
        need = [("training.batch_size", tcfg.batch_size, "weak", len(self.weak_train))]
        if self.strong_train is not None:
            need.append(
                (
                    "training.strong_batch_size",
                    tcfg.strong_batch_size,
                    "strong",
                    len(self.strong_train),
                )
            )
            if tcfg.pseudo_cls_batch_size is not None and self.strategy.pseudo_cls_strong:
                need.append(
                    (
                        "training.pseudo_cls_batch_size",
                        tcfg.pseudo_cls_batch_size,
                        "strong",
                        len(self.strong_train),
                    )
                )
        for key, size, name, n in need:
            if min(size, n) < world:
                raise LymphdxError(
                    f"{key} = {size} is the global batch, split across the {world} processes, "
                    f"and the {name} set's training split holds {n} scans: both must be at "
                    f"least {world}, so that every process gets a scan of every batch"
                )

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything ``--resume`` needs; ``model`` holds the student's weights."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best": dict(self.best),
            "pseudo": pseudo_to_state(self.pseudo),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "swa": None
            if self.swa is None
            else {**self.swa.state_dict(), "first_epoch": self.swa_first},
            "selection": self.config.training.selection,
            "propagation_start": self.propagation_start,
            "steps_done": self.steps_done,
            "bags": None if self.bags is None else self.bags.state_dict(),
            "config_yaml": dump_config(self.config),
            "lymphdx_version": lymphdx.__version__,
            "fingerprint": run_fingerprint(self.config, self.run_dir),
        }

    def restore(self, state: dict[str, Any]) -> None:
        verify_checkpoint(
            state, self.config, self.run_dir, f"cannot resume {self.run_dir}", resume=True
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best = dict(state["best"])
        self.pseudo = pseudo_from_state(state["pseudo"], self.run_dir)
        start = state.get("propagation_start")
        self.propagation_start = None if start is None else int(start)
        self.steps_done = int(state.get("steps_done", 0))
        if self.bags is not None and state.get("bags") is not None:
            self.bags.load_state_dict(state["bags"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("swa") is not None:
            self.swa = SwaAverager(self.model)
            self.swa.load_state_dict(state["swa"])
            self.swa_first = int(state["swa"]["first_epoch"])
        self.history = [
            r for r in read_history(self.run_dir / "history.csv") if int(r["epoch"]) < self.epoch
        ]
        self.val_predictions = [
            r
            for r in selection.read_val_predictions(self.run_dir / selection.VAL_PREDICTIONS)
            if int(r["epoch"]) < self.epoch
        ]

    def train_step(
        self,
        step: int,
        weak_batch: list[int] | None,
        strong_batch: list[int] | None,
        patch_batch: list[int] | None = None,
    ) -> dict[str, float]:
        """One optimiser step on a global batch: positions in the weak training set (None
        in the ROI warm-up), in the strong one as whole scans (ROI masks without patches,
        pseudo class labels) and as ROI patches. This rank trains on its block of each.
        Returns the global batch's losses."""
        weak = (
            None if weak_batch is None else self._load(self.weak_train, weak_batch, step, 0, "weak")
        )
        strong = patches = None
        if strong_batch is not None:
            assert self.strong_train is not None
            strong = self._load(self.strong_train, strong_batch, step, 1, "strong")
            strong["global"] = strong_batch
        if patch_batch is not None:
            assert self.strong_train is not None
            patches = self._load(self.strong_train, patch_batch, step, 2, "patch")
        sizes = (
            len(weak_batch or []),
            len(strong_batch or []),
            len(patch_batch or []),
        )
        # the backward pass stays inside the routing: checkpointing re-runs the forward
        total, terms = self._losses(step, weak, strong, patches, sizes)
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_step(total, self.optimizer, self.scaler)  # scaler: fp16 AMP
        self.steps_done += 1
        if self.ema is not None:
            self.ema.update(self.model, self.ema.updates)
        losses = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        return {"loss": float(total.detach()), **losses}

    def train_epoch(self) -> dict[str, float]:
        set_epoch_lr(self.optimizer, self.config.training, self.epoch)
        self.train_model.train()
        batches = self.epoch_batches()
        sums: dict[str, float] = {}
        for step, (wb, sb, pb) in enumerate(batches):
            for k, v in self.train_step(step, wb, sb, pb).items():
                sums[k] = sums.get(k, 0.0) + v
        self.ctx.average_buffers(self.model)  # batch-norm running statistics
        if self.ema is not None:
            self.ctx.average_buffers(self.ema.module)
        row = {k: v / len(batches) for k, v in sums.items()}
        row["phase"] = "roi-warmup" if self.epoch < self.roi_warmup else "joint"
        return row

    def score(self, model: MultiTaskNet) -> tuple[dict[str, float], np.ndarray]:
        """``model``'s validation row (AUC, BCE, strong-set Dice) and its probabilities
        ``(N_val,)`` for the weak set's validation split."""
        probs = predict_volumes(
            model, self.weak_val, ctx=self.ctx, domain=WEAK, inferer=self.inferer
        )
        labels = self.weak_val.labels
        row = {"val_auc": compute_auc(labels, probs), "val_loss": binary_log_loss(labels, probs)}
        if self.strong_val is not None and len(self.strong_val):
            row["strong_val_dice"] = self.strong_val_dice(model)
        return row, probs

    def strong_val_dice(self, model: MultiTaskNet) -> float:
        """``model``'s Dice on the strong validation split at ζ, pooled over its scans."""
        assert self.strong_val is not None
        zeta = self.config.propagation.roi_threshold
        return strong_dice(model, [self.strong_val], zeta, self.ctx, self.inferer)

    def strong_fit_dice(self, model: MultiTaskNet) -> tuple[float, int]:
        """``model``'s Dice at ζ pooled over all strong training and validation scans, and
        their number: what the switches read (propagation's Dice gate, "the decoder found
        no node"), steadier than the validation split's few patients (BENCHMARKS.md)."""
        sets = [v for v in (self.strong_train, self.strong_val) if v is not None and len(v)]
        zeta = self.config.propagation.roi_threshold
        return strong_dice(model, sets, zeta, self.ctx, self.inferer), sum(map(len, sets))

    def _best_model(self) -> MultiTaskNet:
        """The weights ``checkpoints/best.pt`` holds (the selected model's at the end of a
        fixed budget; else read back)."""
        if self.config.training.selection in ("last", "ema_last"):
            return self.selected_model
        self.ctx.barrier()  # rank 0 wrote best.pt; every rank reads it
        model = build_model(self.config.model)
        model.load_state_dict(load_checkpoint(checkpoint_path(self.run_dir, "best"))["model"])
        return model.to(self.ctx.device)

    def bags_due(self) -> bool:
        """Whether this epoch starts with a refresh of the bags' peaks (``sampler: tiles``):
        at the end of the ROI warm-up (else after the first epoch), then every
        ``training.bag_refresh_every`` epochs."""
        if self.bags is None:
            return False
        first = max(1, self.roi_warmup)
        every = self.config.training.bag_refresh_every
        return self.epoch >= first and (self.epoch - first) % every == 0

    def refresh_bags(self) -> dict[str, float]:
        """The peaks of the teacher's sliding-window ROI maps of the training scans that
        are read as bags (the weak set; the strong set's too for its pseudo class labels):
        the tiles the classifier reads until the next refresh."""
        assert self.bags is not None
        summary = self.bags.refresh(self.teacher, self.weak_train, "weak", self.epoch, self.ctx)
        if self.strategy.pseudo_cls_strong and self.strong_train is not None:
            with domains(self.teacher, STRONG):
                summary.update(
                    self.bags.refresh(
                        self.teacher, self.strong_train, "strong", self.epoch, self.ctx
                    )
                )
        log.info("epoch %d: bags refreshed %s", self.epoch, summary)
        return summary

    def validation_due(self) -> bool:
        """Validation runs every ``training.validate_every`` epochs and at the last."""
        every, last = self.config.training.validate_every, self.config.training.epochs - 1
        return self.epoch == last or self.epoch % every == 0

    def validate(self) -> dict[str, float]:
        """Score the model that selection chooses among (the EMA under ``ema``)."""
        row, probs = self.score(self.selected_model)
        labels = self.weak_val.labels
        assert labels is not None
        self.val_predictions += [
            {"epoch": self.epoch, "patient_id": pid, "label": int(y), "probability": f"{p:.8f}"}
            for pid, y, p in zip(self.weak_val.patient_ids, labels, probs, strict=True)
        ]
        return row

    def epoch_end(self, row: dict[str, Any], writer: Any) -> None:
        if self.ctx.is_distributed:
            self.ctx.check_identical(self.model, f"after epoch {self.epoch}")
            if self.ema is not None:
                self.ctx.check_identical(self.ema.module, f"(EMA teacher) after epoch {self.epoch}")
        self.history.append(row)
        self._average_epoch()
        chosen = self._select(row)  # collectives inside (SWA validation): every rank
        validated = self.selected_model
        self.epoch += 1
        if not self.ctx.is_main:
            return
        write_history(self.run_dir / "history.csv", self.history)
        selection.write_val_predictions(
            self.run_dir / selection.VAL_PREDICTIONS, self.val_predictions
        )
        for k, v in row.items():
            if isinstance(v, float) and k != "epoch":
                writer.add_scalar(k, v, row["epoch"])
        state = self.state()
        if chosen is not None:  # weights to score: no pseudo masks (only --resume reads them,
            # from last.pt), so that no best.pt names a RUN/pseudo/ round pruned since
            best = {k: v for k, v in self._checkpoint_of(chosen, state).items() if k != "pseudo"}
            save_checkpoint(checkpoint_path(self.run_dir, "best"), best)
        if self.config.training.keep_epochs:  # the validated weights of this epoch
            kept = {
                k: v for k, v in state.items() if k not in ("optimizer", "ema", "swa", "pseudo")
            }
            kept.update(
                best={
                    "val_auc": row["val_auc"],
                    "val_loss": row["val_loss"],
                    "epoch": row["epoch"],
                },
                selection="epoch",
            )
            name = f"epoch_{row['epoch']:03d}"
            save_checkpoint(
                checkpoint_path(self.run_dir, name), self._checkpoint_of(validated, kept)
            )
        save_checkpoint(checkpoint_path(self.run_dir, "last"), state)
        # RUN/pseudo/: the round that last.pt (what --resume reads) names; older ones go
        store = self.pseudo.weak_store
        prune_pseudo(self.run_dir, set() if store is None else {store})

    def run(self, progress: bool = True) -> dict[str, Any]:
        writer = None
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.epoch)
        epochs = self.config.training.epochs
        bar = tqdm(
            range(self.epoch, epochs),
            initial=self.epoch,
            total=epochs,
            desc=self.config.strategy,
            disable=None if progress and self.ctx.is_main else True,
            leave=False,
        )
        try:
            for _ in bar:
                start = time.perf_counter()
                torch.manual_seed(self.config.seed * 100_003 + self.epoch)  # dropout etc.
                propagated = self.propagation_due()
                gate = dict(self.gate_reading)
                if propagated:
                    self.propagation()
                refreshed = self.refresh_bags() if self.bags_due() else {}
                row: dict[str, Any] = {"epoch": self.epoch, **self.train_epoch(), **refreshed}
                row.update(gate)
                if self.validation_due():
                    row.update(self.validate())
                row.update(
                    propagated=int(propagated),
                    lr=self.optimizer.param_groups[0]["lr"],
                    seconds=round(time.perf_counter() - start, 3),
                    step=self.steps_done,
                )
                if propagated:
                    row.update(self.pseudo.summary())
                if self.propagation_note:
                    row["propagation_note"] = self.propagation_note
                log.info(
                    "epoch %d %s",
                    self.epoch,
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                )
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_auc=f"{row.get('val_auc', -1):.3f}")
                self.epoch_end(row, writer)
            if self.strategy.roi_strong and self.strong_train is not None:
                # did the decoder of best.pt's weights find nodes? read on all strong
                # training + validation scans (the switches after training read it)
                dice, n = self.strong_fit_dice(self._best_model())
                status = write_roi_status(self.run_dir, dice, n, self.ctx.is_main)
                if status["note"]:
                    log.warning("%s", status["note"])
            if self.ctx.is_distributed:
                checksum = self.ctx.check_identical(self.model, "at the end of training")
                log.info(
                    "weights identical on %d ranks (sha256 %s)", self.ctx.world_size, checksum[:16]
                )
        finally:
            if writer is not None:
                writer.close()
        return {"best": self.best, "epochs": self.epoch}
