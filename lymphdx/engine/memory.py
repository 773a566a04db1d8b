"""Peak-memory estimates for a training step or an inference pass, without running them.

The step is traced on PyTorch's ``meta`` device (shapes only, no data, no arithmetic)
under a dispatch mode that follows every tensor storage from its creation to its last
reference, so the estimate is the largest sum of live storages — activations kept for
backward, gradients, temporaries, parameters and optimizer state — at any moment of the
step. Checkpointing (recomputation) is traced like any other code, so its savings show
up. Tracing the paper's 512×512×256 step takes about a second.

What it does not see: the memory of the Python process itself, oneDNN's reordered
weight/activation copies and workspaces, and allocator fragmentation. ``rss_factor``
(measured by ``benchmarks/full_resolution.py``, BENCHMARKS.md §2.4) scales the traced
peak to the resident memory of a real CPU step.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lymphdx.core.config import Config, ModelConfig
from lymphdx.core.errors import LymphdxError

__all__ = [
    "PeakTracker",
    "MemoryEstimate",
    "estimate_step_memory",
    "available_memory",
    "check_memory",
    "RSS_FACTOR",
    "RSS_BASE",
]

#: resident memory of a CPU step ≈ RSS_BASE + RSS_FACTOR × traced peak (BENCHMARKS.md §2.4)
RSS_FACTOR = 1.25
RSS_BASE = 600 << 20


class PeakTracker(TorchDispatchMode):
    """Follows live tensor storages created inside the mode; ``peak`` is in bytes.

    Storages that exist before the mode is entered (e.g. parameters) are not seen; add
    them with ``track``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage from now until it is freed."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    """Traced peak of one step (bytes) and the predicted resident memory on a CPU."""

    traced_bytes: int
    params: int

    @property
    def rss_bytes(self) -> int:
        return int(RSS_BASE + RSS_FACTOR * self.traced_bytes)

    def __str__(self) -> str:
        return (
            f"{self.rss_bytes / 2**30:.1f} GiB (traced tensors {self.traced_bytes / 2**30:.1f} GiB)"
        )


def _step_batch(config: Config) -> tuple[int, bool | slice]:
    """Volumes per forward and which of them are decoded, as the trainer does it."""
    from lymphdx.core.strategies import get_strategy

    s = get_strategy(config.strategy)
    nw = config.training.batch_size
    ns = config.training.strong_batch_size if s.uses_strong else 0
    if s.pseudo_roi_weak:
        return nw + ns, True if ns else slice(0, nw)
    if s.roi_strong:
        return nw + ns, slice(nw, None)
    return nw + ns, False


def estimate_step_memory(
    model_cfg: ModelConfig,
    shape_zyx: tuple[int, int, int],
    batch: int,
    roi: bool | slice = True,
    train: bool = True,
    optimizer: bool = True,
) -> MemoryEstimate:
    """Trace one step of a ``(batch, 1, *shape_zyx)`` input on the meta device.

    ``train``: forward, loss, backward and an Adam step (its state included); else a
    forward under ``no_grad`` in eval mode (inference).
    """
    from lymphdx.engine.losses import RoiLoss
    from lymphdx.models.multitask import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    model.train(train)
    tracker = PeakTracker()
    params = sum(p.numel() for p in model.parameters())
    with tracker:
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        x = torch.empty(batch, 1, *shape_zyx, device="meta")
        if not train:
            with torch.no_grad():
                model(x, roi=roi)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
            out = model(x, roi=roi)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out["cls"], torch.zeros_like(out["cls"])
            )
            if "roi" in out:
                target = torch.zeros_like(out["roi"], dtype=torch.uint8)
                loss = loss + RoiLoss()(out["roi"], target)
            del out
            loss.backward()
            del loss
            if optimizer:
                opt.step()
    return MemoryEstimate(tracker.peak, params)


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by a cgroup limit if any."""
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            used_path = path.replace("memory.max", "memory.current").replace(
                "limit_in_bytes", "usage_in_bytes"
            )
            try:
                used = int(open(used_path).read().strip())
            except (OSError, ValueError):
                used = 0
            room = int(text) - used
            avail = room if avail is None else min(avail, room)
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail


#: steps of fewer voxels (batch × volume) are not traced: at the ~500 bytes per voxel
#: measured for lymphdx's networks they need well under 2 GiB
SMALL_STEP_VOXELS = 1 << 22


def check_memory(
    config: Config, device: torch.device | str = "cpu", available: int | None = None
) -> MemoryEstimate | None:
    """Refuse a training config whose step will not fit in memory, with the fix.

    Returns the estimate when it fits, None for steps too small to be worth tracing.
    ``available`` defaults to ``available_memory()`` (CPU) or the free CUDA memory.
    """
    if config.training.sampler == "tiles":  # bags of tiles and ROI patches, all decoded
        t, inf = config.training, config.inference
        assert t.roi_patch is not None
        x, y, z = t.roi_patch  # the bags' tiles counted in patches of as many voxels
        bag = inf.bag_tile or inf.tile
        tiles = t.batch_size * (inf.bag_tiles + t.bag_random)
        batch = math.ceil(tiles * math.prod(bag) / (x * y * z)) + t.strong_batch_size
        roi: bool | slice = True
    else:
        assert config.data.shape is not None
        x, y, z = config.data.shape
        batch, roi = _step_batch(config)
    if available is None and batch * x * y * z < SMALL_STEP_VOXELS:
        return None
    t_tiles = config.training.sampler == "tiles"
    est = estimate_step_memory(config.model, (z, y, x), batch, roi)
    cuda = torch.device(device).type == "cuda"
    need = int(RSS_FACTOR * est.traced_bytes) if cuda else est.rss_bytes
    if available is not None:
        room = available
    elif cuda:
        room = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        room = available_memory()
    if need > room:
        fixes = []
        if config.model.checkpointing != "block":
            with_ckpt = estimate_step_memory(
                config.model.model_copy(update={"checkpointing": "block"}), (z, y, x), batch, roi
            )
            fixes.append(f"model.checkpointing: block (→ {with_ckpt})")
        if batch > 1:
            fixes.append("a smaller training.batch_size / strong_batch_size")
        smaller = "training.roi_patch / inference.bag_tile" if t_tiles else "data.shape"
        fixes.append(f"a smaller {smaller}")
        raise LymphdxError(
            f"a training step of strategy {config.strategy!r} at "
            f"{'training.roi_patch' if t_tiles else 'data.shape'} {[x, y, z]} with {batch} "
            "volumes per step needs about "
            f"{need / 2**30:.1f} GiB ({'CUDA' if cuda else 'resident'}; {est}), but only "
            f"{room / 2**30:.1f} GiB is {'free on the GPU' if cuda else 'available'}; use "
            f"{', or '.join(fixes)} (or training.memory_check: false to try anyway)"
        )
    return est
