"""``training.lr_schedule``: the learning rate of each epoch.

- ``constant``: ``training.lr`` throughout (the paper; every preset's until 2026-12-08).
- ``poly``: nnU-Net's polynomial decay, ``lr · (1 − e / E) ** lr_poly_exponent`` at epoch
  ``e`` of ``E`` (``training.epochs``). The last epochs take small steps, so a run ends
  near where its last epochs were, not wherever the last steps at the full rate left it.

The rate is set at the start of each epoch from the epoch alone, so ``--resume`` replays
it. A run trained on to more epochs than it started with (``--resume`` with a larger
``training.epochs``) under ``poly`` has its rate raised again to where the longer
schedule places that epoch: it is not the same as a run of the longer budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lymphdx.core.config import TrainingConfig

__all__ = ["LR_SCHEDULES", "epoch_lr", "set_epoch_lr"]


def _constant(cfg: TrainingConfig, epoch: int) -> float:
    return cfg.lr


def _poly(cfg: TrainingConfig, epoch: int) -> float:
    return cfg.lr * (1.0 - epoch / cfg.epochs) ** cfg.lr_poly_exponent


LR_SCHEDULES: dict[str, Callable[[TrainingConfig, int], float]] = {
    "constant": _constant,
    "poly": _poly,
}


def epoch_lr(cfg: TrainingConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``cfg.lr_schedule``."""
    return LR_SCHEDULES[cfg.lr_schedule](cfg, epoch)


def set_epoch_lr(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, epoch: int) -> None:
    """Set every parameter group of ``optimizer`` to epoch ``epoch``'s rate."""
    lr = epoch_lr(cfg, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
