"""Pseudo ROI masks on disk, ``RUN/pseudo/`` (``data.fit: whole``; ARCHITECTURE.md,
"Storage at the working spacing").

Scans of their own sizes make pseudo masks of their own sizes: a hundred weak scans of
TCIA size at 1.5 mm are about 2 GB of uint8, too much to write into ``last.pt`` and
``best.pt`` every epoch, to send between processes and to keep in every process's
memory. A propagation round is written once, as ``RUN/pseudo/epoch_EEE/mask_NNNNN.npy``
(and ``weight_NNNNN.npy`` with an ignore band or a classifier gate), into a temporary
folder renamed when complete; the checkpoint records the round's folder name, and
training reads the masks memory-mapped, so a tile reads only its bytes. Rounds that
``last.pt`` no longer names are removed after it is written (``prune``); ``best.pt`` holds
no masks (only ``--resume`` reads them). Masks on
the fixed grid (``fit: crop`` / ``resize``) are small and stay in the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from lymphdx.core.errors import LymphdxError
from lymphdx.engine.distributed import DistContext

__all__ = ["PSEUDO_DIR", "read_round", "write_round", "prune", "round_name"]

PSEUDO_DIR = "pseudo"
INDEX = "index.json"


def round_name(epoch: int) -> str:
    """The folder of the propagation round made at the start of ``epoch``."""
    return f"epoch_{epoch:03d}"


def write_round(
    run_dir: Path,
    epoch: int,
    masks: list[np.ndarray],
    weights: list[np.ndarray] | None,
    ctx: DistContext | None = None,
) -> str:
    """Write one round's masks ``(D, H, W)`` uint8 per scan (and their weights) under
    ``run_dir/pseudo/``, atomically; returns the round's folder name.

    With a distributed ``ctx``, ``masks`` and ``weights`` are this rank's block of the
    scans (``ctx.shard``'s order): each rank writes its own files into the round's
    temporary folder (the run folder is shared, as for checkpoints), so no mask travels
    between processes; rank 0 writes the index and renames the folder. Every rank gets the
    name, or the error of any rank."""
    ctx = ctx or DistContext()
    if weights is not None and len(weights) != len(masks):
        raise ValueError(f"{len(masks)} pseudo masks but {len(weights)} weight maps")
    root = Path(run_dir) / PSEUDO_DIR
    name = round_name(epoch)
    tmp = root / f".tmp-{name}"

    def start() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    def write_block() -> None:
        for k, mask in enumerate(masks):
            i = first + k
            np.save(tmp / f"mask_{i:05d}.npy", np.ascontiguousarray(mask, dtype=np.uint8))
            if weights is not None:
                np.save(tmp / f"weight_{i:05d}.npy", np.ascontiguousarray(weights[k], np.uint8))

    parts = ctx.all_gather_object([list(m.shape) for m in masks])  # every rank's block
    shapes = [shape for part in parts for shape in part]
    first = sum(len(part) for part in parts[: ctx.rank])
    ctx.on_main(start)  # every rank waits for the folder (the error reaches every rank)
    ctx.on_every_rank(write_block)

    def finish() -> None:
        index = {"epoch": epoch, "n": len(shapes), "weighted": weights is not None}
        (tmp / INDEX).write_text(json.dumps({**index, "shapes": shapes}))
        final = root / name
        if final.exists():  # the same epoch made again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)

    ctx.on_main(finish)
    return name


def read_round(run_dir: Path, name: str) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The masks (and weights, or None) of round ``name``, memory-mapped, ``(D, H, W)``
    uint8 per scan."""
    folder = Path(run_dir) / PSEUDO_DIR / name
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise LymphdxError(
            f"{folder}: the pseudo masks that the checkpoint names cannot be read ({err}); "
            "the run folder is incomplete (copy RUN/pseudo/ with the checkpoints)"
        ) from None
    masks = [np.load(folder / f"mask_{i:05d}.npy", mmap_mode="r") for i in range(index["n"])]
    weights = (
        [np.load(folder / f"weight_{i:05d}.npy", mmap_mode="r") for i in range(index["n"])]
        if index["weighted"]
        else None
    )
    return masks, weights


def prune(run_dir: Path, keep: set[str]) -> None:
    """Remove the rounds (and unfinished temporary folders) of ``run_dir/pseudo/`` whose
    names are not in ``keep``."""
    root = Path(run_dir) / PSEUDO_DIR
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
