"""Multi-process training with ``torch.distributed`` (DDP), launched with ``torchrun``.

One process per rank; ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE``. Without them (a plain ``lymphdx train``) the context is a single
process: world size 1, every helper a no-op, and training takes exactly the code path it
takes without this module.

How a run is split across ranks (see ``trainer``):
    - every rank draws the same global batches (``epoch_order``: seed, epoch, stream) and
      trains on its block of each (``shard``), so N ranks with global batch B replay the
      one-process run with batch B;
    - the loss terms are those of the whole global batch (``losses``: ``global_sum`` of
      per-rank sums, differentiable), so the gradient DDP averages is the one-process gradient; only
      batch-norm statistics are per rank (``SyncBatchNorm`` on CUDA makes them global;
      it does not run on CPU, see ``DistContext.wrap``);
    - propagation and validation: each rank predicts its block of the volumes and
      ``all_gather_array`` puts the results back in order on every rank;
    - rank 0 alone writes the run folder; ``on_main`` runs a step there and raises its
      error on every rank, so no rank waits forever for a rank that failed.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lymphdx.core.errors import LymphdxError

__all__ = [
    "DistContext",
    "distributed",
    "is_main_process",
    "resolve_device",
    "state_checksum",
]

T = TypeVar("T")

# Rank 0 may work alone for a while (splits, normalisation statistics, checkpoints) while
# the others wait in a collective; the default (10-30 min by backend) is too short for the
# paper preset's first preprocessing pass.
TIMEOUT = timedelta(hours=2)


def is_main_process() -> bool:
    """Whether this process is rank 0 (always, outside ``torchrun``)."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when available, else CPU; CUDA runs on GPU ``local_rank``."""
    if requested not in ("auto", "cpu", "cuda"):
        raise LymphdxError(f"training.device must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LymphdxError(
            "training.device is 'cuda' but PyTorch sees no CUDA GPU (CPU-only build, or no "
            "driver); use device 'auto' or 'cpu'"
        )
    if local_rank >= torch.cuda.device_count():
        raise LymphdxError(
            f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "start at most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Args:
        rank: global rank, 0..world_size-1; rank 0 writes the run folder.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        local_world_size: processes on this node (shares the CPU cores).
        device: where the model and batches live.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str = "auto") -> DistContext:
        """The context that ``torchrun``'s environment variables describe."""
        env = os.environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
            local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError as err:
            raise LymphdxError(f"bad torch.distributed environment variable: {err}") from None
        if not 0 <= rank < world:
            raise LymphdxError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local_rank, local_world, resolve_device(device, local_rank))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        """``nccl`` for CUDA, ``gloo`` for CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    # -- collectives (no-ops in a single process) ----------------------------------------
    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if not self.is_distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only (others get None); its error is raised on every rank."""
        if not self.is_distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # re-raised below, on every rank
                error = err
        message = self.broadcast_object(None if error is None else str(error))
        if error is not None:
            # Clear the local as the error leaves: else the cycle error → traceback → this
            # frame → error keeps every frame it passes through, with its locals (a DDP
            # module and its process group), alive until a GC pass, maybe at shutdown.
            try:
                raise error
            finally:
                error = None
        if message is not None:
            raise LymphdxError(f"rank 0 stopped: {message}")
        return result

    def on_every_rank(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it fails on any rank, every rank raises (the failed
        ranks their own error), so none is left waiting in a later collective."""
        if not self.is_distributed:
            return fn()
        result, error = None, None
        try:
            result = fn()
        except Exception as err:  # re-raised below, on every rank
            error = err
        messages = self.all_gather_object(None if error is None else str(error))
        if error is not None:
            try:
                raise error
            finally:  # no reference cycle (see on_main)
                error = None
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            raise LymphdxError(f"rank {failed[0][0]} stopped: {failed[0][1]}")
        return result  # type: ignore[return-value]

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of ``items``; blocks differ in size by at most 1,
        and concatenating them in rank order gives ``items`` back."""
        n, w, r = len(items), self.world_size, self.rank
        return list(items[r * n // w : (r + 1) * n // w])

    def all_gather_array(self, local: np.ndarray) -> np.ndarray:
        """Concatenate every rank's ``local`` ``(n_r, ...)`` along axis 0, in rank order.

        Blocks may differ in length (or be empty); trailing shapes and dtypes must agree.
        Goes through padded tensors, not pickles, so large masks are not copied twice.
        """
        if not self.is_distributed:
            return local
        shapes = self.all_gather_object((tuple(local.shape), local.dtype.str))
        filled = [(s, d) for s, d in shapes if s[0] > 0]
        if not filled:
            return local
        trailing, dtype = filled[0][0][1:], np.dtype(filled[0][1])
        if any(s[1:] != trailing or d != dtype.str for s, d in filled):
            raise LymphdxError(f"all_gather_array: ranks hold arrays of different kinds: {shapes}")
        longest = max(s[0] for s, _ in shapes)
        comm = self.device if self.backend == "nccl" else torch.device("cpu")
        padded = np.zeros((longest, *trailing), dtype=dtype)
        padded[: len(local)] = local
        mine = torch.from_numpy(padded).to(comm)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        return np.concatenate(
            [p[: s[0]].cpu().numpy() for p, (s, _) in zip(parts, shapes, strict=True)]
        )

    def global_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks, differentiable: the backward pass sums the gradients of
        every rank's copy, which DDP's averaging then divides by the world size again, so
        each rank's parameters get the gradient of the one global value."""
        if not self.is_distributed:
            return t
        return _GlobalSum.apply(t)

    def average_buffers(self, module: nn.Module) -> None:
        """Average the floating buffers (batch-norm running statistics) over ranks.

        Each rank's running mean is an exponential average of its own batch means, so the
        average over ranks is the running mean of the global batch's mean (for equal
        blocks); the running variance misses the spread between blocks.
        """
        if not self.is_distributed:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(self.world_size)

    def check_identical(self, module: nn.Module, what: str) -> str:
        """Raise ``LymphdxError`` unless every rank holds the same parameters and buffers;
        returns the checksum."""
        mine = state_checksum(module)
        sums = self.all_gather_object(mine)
        if len(set(sums)) > 1:
            listing = ", ".join(f"rank {r}: {s[:12]}" for r, s in enumerate(sums))
            raise LymphdxError(
                f"model weights differ between ranks {what} ({listing}); the ranks did not "
                "train in lockstep (a bug: please report it with train.log)"
            )
        return mine

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """The module to train: ``DistributedDataParallel`` when distributed, else ``model``.

        Buffers are not broadcast at each forward (``average_buffers`` after each epoch
        instead), so rank 0's batch statistics do not replace the others'. Every parameter
        that requires a gradient gets one at every step (a strategy that never trains the
        decoder freezes it), so DDP need not search for unused parameters, except with
        domain-specific batch norm (``find_unused``): a domain's affine parameters get no
        gradient from a step whose (sub-)batch holds none of its scans.
        """
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # torch >= 2.13 renames broadcast_buffers (which warns there) to forward_sync_buffers
        renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
            **no_sync,
        )


class _GlobalSum(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) of the gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def state_checksum(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # any dtype
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def distributed(device: str = "auto", init_method: str | None = None) -> Iterator[DistContext]:
    """The process's ``DistContext``; joins the process group when ``WORLD_SIZE`` > 1.

    ``init_method`` defaults to ``env://`` (what ``torchrun`` sets up). The group is
    destroyed on exit, also on error, unless it existed before (then its owner does).
    """
    ctx = DistContext.from_env(device)
    owned = False
    if ctx.is_distributed and not dist.is_initialized():
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        dist.init_process_group(
            ctx.backend,
            init_method=init_method,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=TIMEOUT,
        )
        owned = True
    try:
        yield ctx
    finally:
        if owned:
            # Free what the body dropped but a reference cycle still holds (a DDP module
            # holds the group) now, not in a GC pass during interpreter shutdown: gloo
            # objects destroyed then can abort the process (SIGABRT) after a good run.
            gc.collect()
            dist.destroy_process_group()
