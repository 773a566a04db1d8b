"""Each hospital's own batch-norm statistics, re-estimated after training (AdaBN).

``evaluation.bn_stats: per_hospital``. Training leaves every batch norm with running
statistics that mix its batches: the weak scans' bags with the strong set's ROI patches.
The ROI decoder, though, learnt on the strong hospital's patches normalised by their own
batch statistics, and a scan of the other hospital (other noise, other contrast phase)
reaches it normalised by that mix. AdaBN (Li et al. 2016, "Revisiting batch normalization
for practical domain adaptation") keeps every weight and re-estimates the statistics of
each domain from its own images: here each hospital's training scans, cut into the
inferer's tiles as inference cuts them.

The model's ``BatchNorm3d`` become ``DomainBatchNorm3d`` with one shared affine (the
trained γ, β) and two sets of statistics (weak = 0, strong = 1); every scorer already
routes a scan to its hospital (``domain_norm.domains``). The statistics are kept in
``RUN/bn_stats.pt`` for the weights they were estimated for, so ``predict`` needs no data.

``evaluation.bn_stats: roi_patches`` (``engine.patch_stats``) keeps plain batch norms and
re-estimates one set of statistics on the strong set's ROI patches; ``apply_domain_stats``
keeps and reads it back the same way.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lymphdx.core.config import Config
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_json
from lymphdx.data.datasets import VolumeSet
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.inferer import make_inferer, pad_to_tile
from lymphdx.engine.patch_stats import estimate_patch_stats, patch_stats_stamp
from lymphdx.engine.roi_status import STATUS_FILE, decoder_status, status_file, strong_dice
from lymphdx.engine.run_data import RunData, data_to_fit
from lymphdx.engine.run_state import weights_stamp
from lymphdx.engine.teacher import update_bn
from lymphdx.models.domain_norm import DomainBatchNorm3d, convert_to_domain_bn

__all__ = [
    "MAX_SCANS",
    "apply_domain_stats",
    "decoder_status_with_stats",
    "estimate_domain_stats",
    "scan_tiles",
    "stats_path",
]

log = logging.getLogger("lymphdx")

#: training scans per hospital the statistics are estimated on (evenly spread over the
#: split's patients): 24 scans give thousands of tiles, and the cost stays a few minutes
MAX_SCANS = 24


def stats_path(run_dir: Path, which: str = "best") -> Path:
    """Where the per-hospital statistics of ``checkpoints/<which>.pt`` are kept."""
    return run_dir / ("bn_stats.pt" if which == "best" else f"bn_stats@{which}.pt")


def scan_tiles(
    image: torch.Tensor, tile: tuple[int, int, int], overlap: float
) -> Iterator[torch.Tensor]:
    """The sliding window's tiles ``(1, 1, d, h, w)`` of ``image`` ``(1, 1, D, H, W)``:
    starts ``tile * (1 - overlap)`` apart, the last flush with the end, a scan smaller
    than a tile padded with 0 (the normalised mean) as MONAI pads it."""
    padded, _ = pad_to_tile(image, tile)
    starts = []
    for size, t in zip(padded.shape[2:], tile, strict=True):
        step = max(1, int(t * (1 - overlap)))
        n = max(1, math.ceil((size - t) / step) + 1)
        starts.append(sorted({min(i * step, size - t) for i in range(n)}))
    d, h, w = tile
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                yield padded[..., z : z + d, y : y + h, x : x + w]


def _spread(volumes: VolumeSet, n: int) -> list[int]:
    """At most ``n`` indices of ``volumes`` spread evenly over it."""
    m = len(volumes)
    return list(range(m)) if m <= n else sorted({round(i * (m - 1) / (n - 1)) for i in range(n)})


def _batches(config: Config, volumes: VolumeSet, domain: int) -> Iterator[tuple[torch.Tensor, int]]:
    """``(tiles (b, 1, d, h, w), domain)`` of up to ``MAX_SCANS`` scans, cut as the inferer
    cuts them, ``inference.tile_batch`` tiles a batch across scans, the remainder joined
    to the last batch (a batch of one small tile has one value per channel at the
    bottleneck); ``whole``: each scan a batch."""
    inference = config.inference
    x, y, z = inference.tile
    b = inference.tile_batch
    pending: list[torch.Tensor] = []
    for i in _spread(volumes, MAX_SCANS):
        image = torch.from_numpy(volumes.image(i))[None, None]
        if config.evaluation.inferer == "whole":
            yield image, domain
            continue
        pending.extend(scan_tiles(image, (z, y, x), inference.overlap))
        while len(pending) >= 2 * b:
            yield torch.cat(pending[:b]), domain
            pending = pending[b:]
    if pending:
        yield torch.cat(pending), domain


def estimate_domain_stats(model: nn.Module, config: Config, data: RunData) -> nn.Module:
    """``model`` (eval mode) with per-hospital batch norms whose statistics are the
    averages over each hospital's training scans' tiles; returned converted in place."""
    batches = [(data.volumes("weak", "train"), WEAK), (data.volumes("strong", "train"), STRONG)]
    for (volumes, _), name in zip(batches, ("weak", "strong"), strict=True):
        if len(volumes) == 0:  # update_bn would leave its statistics reset (mean 0, var 1)
            raise LymphdxError(
                f"evaluation.bn_stats: per_hospital estimates each hospital's statistics on "
                f"its training scans, and the {name} set has none: set bn_stats: trained"
            )
    convert_to_domain_bn(model, n_domains=2, shared_affine=True)

    def all_batches() -> Iterator[tuple[torch.Tensor, int]]:
        for volumes, domain in batches:
            yield from _batches(config, volumes, domain)

    update_bn(model, all_batches(), forward=lambda m, x: m(x, roi=True))
    return model.eval()


def _stamp(checkpoint: Path, config: Config) -> dict[str, Any]:
    """What stored statistics were estimated for: the weights file and the tiling (per
    hospital) or the patches (``roi_patches``)."""
    if config.evaluation.bn_stats == "roi_patches":
        return {**weights_stamp(checkpoint), "bn_stats": "roi_patches", **patch_stats_stamp(config)}
    return {
        **weights_stamp(checkpoint),
        "inferer": config.evaluation.inferer,
        "inference": config.inference.model_dump(mode="json"),
        "max_scans": MAX_SCANS,
    }


def _norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The statistics buffers of every plain batch norm (``roi_patches``)."""
    return {
        f"{name}.{b}": t
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b, t in m.named_buffers(recurse=False)
    }


def _dsbn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v
        for name, m in model.named_modules()
        if isinstance(m, DomainBatchNorm3d)
        for k, v in ((f"{name}.{b}", t) for b, t in m.state_dict().items())
    }


def apply_domain_stats(
    run_dir: Path,
    config: Config,
    model: nn.Module,
    which: str = "best",
    data: RunData | None = None,
) -> nn.Module:
    """``model`` of run ``run_dir``'s ``which`` weights as ``evaluation.bn_stats`` says:
    unchanged (``trained``), with each hospital's statistics (``per_hospital``) or with
    the ROI patches' (``roi_patches``), read from ``bn_stats.pt`` when they were estimated
    for these weights, else estimated now on the run's training scans (``data``, loaded
    when ``None``) and stored."""
    how = config.evaluation.bn_stats
    if how == "trained":
        return model
    run_dir = Path(run_dir)
    if any(isinstance(m, DomainBatchNorm3d) for m in model.modules()):
        raise LymphdxError(
            f"{run_dir}: evaluation.bn_stats: {how} re-estimates the statistics of a "
            "model with plain batch norm; this one was trained with model.norm: domain_batch, "
            "which has each hospital's already: set evaluation.bn_stats: trained"
        )
    path = stats_path(run_dir, which)
    stamp = _stamp(run_dir / "checkpoints" / f"{which}.pt", config)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if stored.get("stamp") == stamp:
            if how == "per_hospital":
                convert_to_domain_bn(model, n_domains=2, shared_affine=True)
            model.load_state_dict({**model.state_dict(), **stored["state"]})
            return model.eval()
    if data is None:
        what = f"{how.replace('_', ' ')} batch-norm statistics for its {which} weights"
        data = data_to_fit(config, run_dir, True, what, "evaluation.bn_stats: trained")
    if how == "roi_patches":
        estimate_patch_stats(model, config, data)
        state = _norm_state(model)
    else:
        estimate_domain_stats(model, config, data)
        state = _dsbn_state(model)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"stamp": stamp, "state": state}, tmp)
    tmp.replace(path)
    log.info("%s batch-norm statistics estimated: %s", how, path)
    return model


def decoder_status_with_stats(
    run_dir: Path, config: Config, model: nn.Module, data: RunData, which: str = "best"
) -> dict[str, Any] | None:
    """Did the decoder find nodes when scored with the re-estimated statistics?

    Under ``evaluation.bn_stats`` other than ``trained``, the status that training wrote
    (``roi_status.json``: running statistics) does not describe the maps every score then
    reads. ``model`` (carrying the statistics) is scored as training scores its decoder
    (Dice at ζ pooled over all strong training + validation scans, the run's inferer, no
    flip) and the status written to ``roi_status_<how>.json`` with the statistics' stamp,
    which ``read_roi_status`` then returns (the readout's "found no node" switch, the
    results). Scored again only when the stamp changed. None under ``trained``, for a run
    without the ROI task's status, or when the strong set cannot be read."""
    how = config.evaluation.bn_stats
    run_dir = Path(run_dir)
    if how == "trained" or not (run_dir / STATUS_FILE).exists():
        return None
    path = run_dir / status_file(how)
    stamp = _stamp(run_dir / "checkpoints" / f"{which}.pt", config)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("stamp") == stamp:
            return stored
    try:
        sets = [data.volumes("strong", s, masks=True) for s in ("train", "val")]
    except LymphdxError as err:
        log.warning("%s: the decoder's status keeps training's statistics: %s", run_dir, err)
        return None
    sets = [v for v in sets if len(v)]
    zeta = config.propagation.roi_threshold
    dice = strong_dice(model, sets, zeta, DistContext(), make_inferer(config))
    status = {**decoder_status(dice, sum(map(len, sets))), "bn_stats": how, "stamp": stamp}
    write_json(path, status)
    log.info("decoder Dice with %s batch-norm statistics: %.3f (%s)", how, dice, path)
    return status
