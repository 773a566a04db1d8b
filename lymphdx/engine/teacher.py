"""Steadier predictions for propagation and model selection on small data.

* ``EmaTeacher``: an exponential moving average of the student's weights (mean teacher,
  Tarvainen & Valpola 2017) that labels the other set instead of the noisy last iterate.
* ``predict_with_tta``: sigmoid probabilities averaged over the identity and the
  left-right flip (the flip augmentation of training).
* ``SwaAverager`` + ``update_bn``: a uniform average of the weights of chosen epochs
  (stochastic weight averaging, Izmailov et al. 2018), with batch-norm statistics
  recomputed for the averaged weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel

from lymphdx.models.domain_norm import DomainBatchNorm3d, domains

__all__ = ["EmaTeacher", "predict_with_tta", "SwaAverager", "update_bn", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(unwrap(model))
    for m in clone.modules():
        if isinstance(m, DomainBatchNorm3d):
            m.routing = None  # a copy made inside ``domains(...)`` must not keep its routing
    for p in clone.parameters():
        p.grad = None
        p.requires_grad_(False)
    return clone.eval()


def _matching(source: nn.Module, target: nn.Module, what: str) -> list[tuple[Any, Any]]:
    """Pairs (target tensor, source tensor) of ``named_parameters``/``named_buffers``."""
    src = dict(getattr(source, what)())
    dst = dict(getattr(target, what)())
    if src.keys() != dst.keys():
        missing = sorted(src.keys() ^ dst.keys())[:5]
        raise ValueError(f"student and average differ in {what[6:]}: {missing}")
    return [(dst[k], src[k]) for k in dst]


class EmaTeacher:
    """Exponential moving average of a model's weights: the teacher network.

    Not ``AveragedModel``: its first update copies the student instead of averaging with
    the starting copy, and its decay cannot follow the optimiser step after a resume.

    ``update(student, step)`` after each optimiser step (``step`` = 0, 1, … counts steps):

        d = min(decay, (1 + step) / (10 + step))
        θ_teacher ← d · θ_teacher + (1 − d) · θ_student

    The warm-up ``(1 + step)/(10 + step)`` (as ``tf.train.ExponentialMovingAverage`` with
    ``num_updates``) lets the teacher follow the fast-moving early student; Tarvainen &
    Valpola's own ramp is ``min(decay, 1 − 1/(step + 1))``, equally short-lived.

    Batch-norm buffers (``buffers``): ``"ema"`` (default) averages the floating buffers
    (running mean/var) with the same ``d``, so they match the averaged weights as well as
    the student's statistics can; ``"copy"`` takes the student's. Integer buffers
    (``num_batches_tracked``) are always copied. Non-floating parameters are copied.

    Args:
        model: the student (DDP/compiled wrappers are unwrapped); it is deep-copied.
        decay: the EMA decay after warm-up (0.99 – 0.999 typical).
        buffers: ``"ema"`` or ``"copy"``.
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.99, buffers: Literal["ema", "copy"] = "ema"
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        if buffers not in ("ema", "copy"):
            raise ValueError(f"buffers must be 'ema' or 'copy', got {buffers!r}")
        self.decay = decay
        self.buffers = buffers
        self.updates = 0
        self._teacher = _frozen_copy(model)

    @staticmethod
    def decay_at(step: int, decay: float) -> float:
        """The decay used at ``step``: ``min(decay, (1 + step) / (10 + step))``."""
        return min(decay, (1.0 + step) / (10.0 + step))

    @property
    def module(self) -> nn.Module:
        """The teacher network, in eval mode, without gradients."""
        return self._teacher.eval()

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """Move the teacher towards ``student``; returns the decay used."""
        d = self.decay_at(step, self.decay)
        student = unwrap(student)
        for t, s in _matching(student, self._teacher, "named_parameters"):
            if t.is_floating_point():
                t.lerp_(s.detach().to(t.dtype), 1.0 - d)
            else:
                t.copy_(s)
        for t, s in _matching(student, self._teacher, "named_buffers"):
            if t.is_floating_point() and self.buffers == "ema":
                t.lerp_(s.to(t.dtype), 1.0 - d)
            else:
                t.copy_(s)
        self.updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self._teacher.state_dict(),
            "decay": self.decay,
            "buffers": self.buffers,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._teacher.load_state_dict(state["model"])
        self.decay = float(state.get("decay", self.decay))
        self.buffers = state.get("buffers", self.buffers)
        self.updates = int(state.get("updates", 0))


def _flip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=(-1,))


@torch.no_grad()
def predict_with_tta(
    model: nn.Module, images: torch.Tensor, roi: bool = True, flips: bool = True
) -> dict[str, torch.Tensor]:
    """Sigmoid probabilities of ``model`` (``forward(x, roi=...)``) on ``images``.

    ``images`` ``(B, 1, D, H, W)`` on the model's device. With ``flips`` the identity and
    the left-right flip (last axis, x) are averaged, the flipped ROI map flipped back
    first. Runs in eval mode (restored after); a model with ``DomainBatchNorm3d`` uses
    the routing of the caller's ``domains`` context (domain 0 without). Returns
    ``{"cls": (B,)}`` and, with ``roi``, ``"roi"`` ``(B, 1, D, H, W)``: probabilities,
    not logits.
    """
    was_training = model.training
    model.eval()
    try:
        views = [False, True] if flips else [False]
        cls: torch.Tensor | None = None
        roi_map: torch.Tensor | None = None
        for flipped in views:
            out = model(_flip(images) if flipped else images, roi=roi)
            c = torch.sigmoid(out["cls"].float())
            cls = c if cls is None else cls + c
            if roi:
                r = torch.sigmoid(out["roi"].float())
                r = _flip(r) if flipped else r
                roi_map = r if roi_map is None else roi_map + r
    finally:
        model.train(was_training)
    assert cls is not None
    result = {"cls": cls / len(views)}
    if roi_map is not None:
        result["roi"] = roi_map / len(views)
    return result


class SwaAverager:
    """Uniform running average of a model's weights over chosen epochs (SWA), kept by
    ``torch.optim.swa_utils.AveragedModel``.

    ``add(model)`` at the end of each chosen epoch; ``module`` is the average (eval mode).
    After averaging, the batch-norm running statistics of ``module`` belong to none of
    the averaged weights (they are the last added model's): recompute them with
    ``update_bn(swa.module, batches)`` before evaluating or propagating with it.
    """

    def __init__(self, model: nn.Module) -> None:
        self._average = AveragedModel(_frozen_copy(model), use_buffers=False)

    @property
    def count(self) -> int:
        """How many models are averaged in."""
        return int(self._average.n_averaged)

    @property
    def module(self) -> nn.Module:
        """The averaged network, in eval mode (its BN statistics: see the class doc)."""
        return self._average.module.eval()

    @torch.no_grad()
    def add(self, model: nn.Module) -> int:
        """Average ``model``'s weights in (θ ← θ + (θ_model − θ)/n); returns ``n``."""
        model = unwrap(model)
        _matching(model, self._average.module, "named_parameters")  # same network
        self._average.update_parameters(model)
        for t, s in _matching(model, self._average.module, "named_buffers"):
            t.copy_(s)
        return self.count

    def state_dict(self) -> dict[str, Any]:
        return {"model": self._average.module.state_dict(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._average.module.load_state_dict(state["model"])
        self._average.n_averaged.fill_(int(state["count"]))


@torch.no_grad()
def update_bn(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]],
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> nn.Module:
    """Recompute every batch norm's running statistics of ``model`` from ``batches``.

    Statistics are reset, then become the equal-weight average over the batches
    (``momentum=None``), as ``torch.optim.swa_utils.update_bn``. ``batches`` yields images
    ``x`` ``(B, 1, D, H, W)`` (moved to the model's device) or ``(x, domain)`` pairs for a
    model with ``DomainBatchNorm3d``: the batch then runs inside ``domains(model, domain)``
    (an ``int`` or ``(B,)`` ids), so one pass over both sets fills every domain's
    statistics; the DSBN ``min_batch`` fallback is off meanwhile, so every item counts.
    ``forward(model, x)`` runs the model (default ``model(x)``, which for ``MultiTaskNet``
    also runs the decoder, so its batch norms get statistics too). The model's mode is
    restored. Returns ``model``.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return model
    dsbn = [m for m in model.modules() if isinstance(m, DomainBatchNorm3d)]
    momenta = [m.momentum for m in norms]
    min_batches = [m.min_batch for m in dsbn]
    was_training = model.training
    device = next(model.parameters()).device
    run = forward or (lambda m, x: m(x))
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        for m in dsbn:
            m.min_batch = 1
        model.train()
        for batch in batches:
            if isinstance(batch, tuple | list):
                x, domain = batch
                with domains(model, domain):
                    run(model, x.to(device))
            else:
                run(model, batch.to(device))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        for m, min_batch in zip(dsbn, min_batches, strict=True):
            m.min_batch = min_batch
        model.train(was_training)
    return model
