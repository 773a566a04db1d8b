"""``training.running_stats``: which training forward passes move the batch norms' running
statistics (those every eval-mode pass normalises with).

A step forwards two kinds of input in train mode: the scans (whole weak and strong scans,
or, with ``training.sampler: tiles``, each scan as a bag of tiles) and, with
``training.roi_patch``, the strong set's node-oversampled ROI patches. Each pass
normalises with its own batch statistics, and by default each also moves the running
statistics, which thus average both kinds of input.

- ``all`` (default): every pass moves them (the behaviour of every run before 2026-12-08).
- ``patches``: only the ROI patches' pass does; the scans' pass still normalises with its
  own batch statistics (gradients unchanged) but leaves the running statistics as they
  were. Eval mode then normalises as the decoder learnt, which is what validation Dice,
  the bags' refresh (the teacher's ROI map), propagation and every score read.

Why: on a clinical run (arm ``d`` of ``benchmarks/issue29_dev_folds.py``, fold 1) the
decoder's eval-mode Dice was 0.009 with the running statistics and 0.703 with the same
weights' statistics re-estimated on ROI patches alone; an equal mix of patches and weak
tiles gave 0.012 (``benchmarks/bn_stats_probe.py``, docs/dev-log-2026-12-07.md).
``evaluation.bn_stats: roi_patches`` mends a finished run; this keeps training's own
eval-mode passes right.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["RUNNING_STATS", "PassContext", "frozen_running_stats", "scan_pass_context"]


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside, train-mode batch norms of ``model`` normalise with their batch statistics
    but leave their running statistics (mean, variance, batch count) unchanged.

    Each norm works on copies of its statistics meanwhile, which are dropped after; the
    tensors themselves are put back, not overwritten, since autograd keeps the copies
    the forward pass updated for the backward pass (and DDP broadcasts into the originals
    before the forward pass)."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    kept = [
        (m, {n: getattr(m, n) for n in names})
        for m in model.modules()
        if isinstance(m, _BatchNorm) and all(getattr(m, n) is not None for n in names)
    ]
    for m, tensors in kept:
        for n, t in tensors.items():
            setattr(m, n, t.clone())
    try:
        yield
    finally:
        for m, tensors in kept:
            for n, t in tensors.items():
                setattr(m, n, t)


#: a context a forward pass runs in, given the model
PassContext = Callable[[nn.Module], AbstractContextManager[None]]


def _moves(model: nn.Module) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


RUNNING_STATS: dict[str, PassContext] = {
    "all": _moves,
    "patches": frozen_running_stats,
}


def scan_pass_context(name: str, patch_pass: bool) -> PassContext:
    """The context the scans' pass of a step runs in under ``training.running_stats``
    ``name``; a run without the ROI patches' pass (``patch_pass`` false: no
    ``training.roi_patch``, or a strategy without the strong set's ROI loss) moves the
    statistics on every pass, else they would never move."""
    return RUNNING_STATS[name] if patch_pass else _moves
