"""Model selection (``training.selection``): which weights ``checkpoints/best.pt`` holds.

    best_val  the paper: the student at the epoch of best validation AUC (ties: lower
              validation loss)
    ema       the EMA teacher at the epoch of its best validation AUC (validation then
              scores the EMA, and the history's val_auc is the EMA's)
    swa       the uniform average of the student's weights over the last
              ``training.swa_epochs`` epochs (Izmailov et al. 2018), batch-norm statistics
              recomputed over the training set; no choice on validation
    last      a fixed-epoch budget: the final weights; no choice on validation

With ten-odd validation patients the best-AUC epoch is close to a coin toss; ``swa`` and
``last`` make no choice on them, and the per-epoch validation predictions
(``val_predictions.csv``) let ``compare --cv`` choose one epoch on all folds pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.files import read_csv, write_csv
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.teacher import SwaAverager, update_bn
from lymphdx.models.multitask import MultiTaskNet
from lymphdx.stats.metrics import auc, binary_log_loss

log = logging.getLogger("lymphdx")

__all__ = [
    "SelectionMixin",
    "VAL_PREDICTIONS",
    "swa_first_epoch",
    "bn_batches",
    "write_val_predictions",
    "read_val_predictions",
    "pooled_best_epoch",
]

VAL_PREDICTIONS = "val_predictions.csv"
_FIELDS = ["epoch", "patient_id", "label", "probability"]


def swa_first_epoch(epochs: int, swa_epochs: int) -> int:
    """The first epoch SWA averages: the last ``swa_epochs`` of ``epochs`` (all if fewer)."""
    return max(0, epochs - swa_epochs)


def bn_batches(
    sets: list[tuple[VolumeSet, int]], batch_size: int
) -> Iterator[tuple[torch.Tensor, int]]:
    """``(images (B, 1, D, H, W), domain)`` over every volume of each ``(set, domain)``, in
    order, without augmentation, for ``teacher.update_bn``; a last batch of one scan joins
    the one before (batch norm needs two)."""
    for volumes, domain in sets:
        n = len(volumes)
        starts = list(range(0, n, batch_size))
        if len(starts) > 1 and n - starts[-1] < 2:
            starts.pop()
        for k, start in enumerate(starts):
            stop = starts[k + 1] if k + 1 < len(starts) else n
            yield volumes.batch(range(start, stop)).images, domain


def write_val_predictions(path: Path, rows: list[dict[str, Any]]) -> None:
    """``val_predictions.csv``: one row per epoch and validation patient."""
    write_csv(path, _FIELDS, ([r.get(k) for k in _FIELDS] for r in rows), "\r\n")


def read_val_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``val_predictions.csv`` (strings), or none if it does not exist."""
    return read_csv(path)


def pooled_best_epoch(
    runs: list[list[dict[str, Any]]],
) -> tuple[int, dict[int, float]]:
    """The epoch whose validation predictions, pooled over ``runs`` (the folds of one
    cross-validation repeat and seed: each a list of ``val_predictions.csv`` rows), have
    the highest AUC; ties go to the lower pooled cross-entropy, then to the earlier epoch.

    Only epochs every run reached count. Returns the epoch and ``{epoch: pooled AUC}``.
    ~40 pooled patients instead of ~8 per fold make the choice less of a coin toss.
    """
    if not runs or any(not rows for rows in runs):
        raise ValueError("pooled selection needs the val_predictions.csv of every fold")
    epochs = set.intersection(*({int(r["epoch"]) for r in rows} for rows in runs))
    if not epochs:
        raise ValueError("the folds share no validated epoch")
    scores: dict[int, float] = {}
    ranked = []
    for epoch in sorted(epochs):
        rows = [r for run in runs for r in run if int(r["epoch"]) == epoch]
        y = np.array([int(r["label"]) for r in rows])
        p = np.array([float(r["probability"]) for r in rows])
        scores[epoch] = auc(y, p)
        ranked.append((-scores[epoch], binary_log_loss(y, p), epoch))
    return min(ranked)[2], scores


class SelectionMixin:
    """``Trainer``'s choice of the weights in ``best.pt`` after each epoch
    (``training.selection``) and its SWA average."""

    config: Config
    epoch: int
    roi_warmup: int
    best: dict[str, float]
    model: torch.nn.Module
    swa: SwaAverager | None
    swa_first: int
    weak_train: VolumeSet
    strong_train: VolumeSet | None

    def swa_bn_sets(self) -> list[tuple[VolumeSet, int]]:
        """The ``(volumes, domain)`` whose batch-norm statistics the SWA average gets: the
        weak training scans, and the strong ones whenever the strategy trains on them, as
        training's running statistics did (with ``domain_batch`` each hospital keeps its
        own). With the weak scans alone the ROI map lost Dice on the other hospital's scans
        (docs/dev-log-2026-11-25_to_2026-12-03.md §7.2, tenth round)."""
        sets = [(self.weak_train, WEAK)]
        if self.strong_train is not None:
            sets.append((self.strong_train, STRONG))
        return sets

    def _average_epoch(self) -> None:
        """Add this epoch's weights to the SWA average when the epoch is in its window."""
        tcfg = self.config.training
        first = swa_first_epoch(tcfg.epochs, tcfg.swa_epochs)
        if tcfg.selection != "swa" or self.epoch < first:
            return
        if self.swa is None or self.epoch == first:
            self.swa = SwaAverager(self.model)
            self.swa_first = self.epoch
        elif self.swa_first != first:
            log.warning(
                "the SWA window moved (training.epochs changed): averaging epochs %d..%d",
                self.swa_first,
                self.epoch,
            )
        self.swa.add(self.model)

    def _select(self, row: dict[str, Any]) -> MultiTaskNet | None:
        """Update ``best`` after this epoch; returns the model ``best.pt`` then holds, or
        None when it does not change (see ``selection``)."""
        tcfg = self.config.training
        final = self.epoch == tcfg.epochs - 1
        if tcfg.selection in ("best_val", "ema"):
            if self.epoch < self.roi_warmup:  # the classifier has not trained yet
                return None
            better = row["val_auc"] > self.best["val_auc"] or (
                row["val_auc"] == self.best["val_auc"] and row["val_loss"] < self.best["val_loss"]
            )
            if not better:
                return None
            chosen = self.selected_model
        elif not final:
            return None
        elif tcfg.selection in ("last", "ema_last"):
            chosen = self.selected_model
        else:  # swa: the average, with batch-norm statistics of its own weights
            assert self.swa is not None
            chosen = self.swa.module  # type: ignore[assignment]
            update_bn(chosen, bn_batches(self.swa_bn_sets(), tcfg.batch_size))
            scored, _ = self.score(chosen)
            log.info("SWA of epochs %d..%d: validation %s", self.swa_first, self.epoch, scored)
            row = {**row, **scored}
        self.best = {"val_auc": row["val_auc"], "val_loss": row["val_loss"], "epoch": row["epoch"]}
        if tcfg.selection == "swa":
            self.best["swa_first_epoch"] = self.swa_first
        return chosen

    def _checkpoint_of(self, model: MultiTaskNet, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with ``model``'s weights (what evaluate and predict load)."""
        return {**state, "model": model.state_dict()} if model is not self.model else state
