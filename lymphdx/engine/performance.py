"""Speed options of a training step: mixed precision, channels-last-3d, torch.compile.

All off by default: on this project's reference CPU (2-core AMD EPYC, AVX2, no AVX-512)
bf16 autocast is about 10× slower than fp32 and torch.compile spends minutes compiling
for a small gain (see BENCHMARKS.md §2.4, ``benchmarks/precision_layout.py``). On a CUDA GPU
``precision: fp16`` (AMP with a gradient scaler) or ``bf16`` is the usual choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from lymphdx.core.config import TrainingConfig
from lymphdx.core.errors import ConfigError

__all__ = ["autocast", "grad_scaler", "optimizer_step", "prepare_model", "prepare_input"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(cfg: TrainingConfig, device: torch.device | str) -> Iterator[None]:
    """Autocast for ``cfg.precision`` (``fp32``: nothing) on ``device``'s type."""
    kind = torch.device(device).type
    if cfg.precision == "fp32":
        yield
        return
    if cfg.precision == "fp16" and kind != "cuda":
        raise ConfigError("training.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    with torch.autocast(kind, dtype=_DTYPES[cfg.precision]):
        yield


def grad_scaler(cfg: TrainingConfig, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 AMP, else None (bf16 and fp32 need none)."""
    if cfg.precision == "fp16":
        return torch.amp.GradScaler(torch.device(device).type)
    return None


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward of ``loss`` and one step of ``optimizer``, through ``scaler`` (fp16 AMP)
    when there is one; the gradients must have been zeroed."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def prepare_model(model: torch.nn.Module, cfg: TrainingConfig) -> Any:
    """Channels-last-3d weights and/or ``torch.compile`` as configured.

    Returns the module to call; the bare ``model`` keeps the weights (its state dict has no
    compile prefixes), so checkpoints are taken from it.
    """
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last_3d)
    if cfg.compile:
        return torch.compile(model, dynamic=False)
    return model


def prepare_input(x: torch.Tensor, cfg: TrainingConfig) -> torch.Tensor:
    """``(B, C, D, H, W)`` in the memory format the model expects."""
    if cfg.channels_last:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x
