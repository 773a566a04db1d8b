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

import csv
import io as _io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lymphdx.core.files import write_text
from lymphdx.data.datasets import VolumeSet
from lymphdx.stats.metrics import auc

__all__ = [
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
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def read_val_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``val_predictions.csv`` (strings), or none if it does not exist."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


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
        p = np.clip(np.array([float(r["probability"]) for r in rows]), 1e-7, 1 - 1e-7)
        scores[epoch] = auc(y, p)
        bce = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        ranked.append((-scores[epoch], bce, epoch))
    return min(ranked)[2], scores
