"""``train``: one run into a run folder, on one process or on every rank under
``torchrun``: open (or resume) the folder, check and share the data, build the
``Trainer``, run it, and leave nothing behind when a new run is refused early."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lymphdx.core.config import Config
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import (
    folder_problem,
    path_problem,
    remove_stale_temporaries,
    run_lock,
)
from lymphdx.core.strategies import get_strategy
from lymphdx.engine.distributed import DistContext, distributed
from lymphdx.engine.domain_stats import decoder_status_with_stats
from lymphdx.engine.memory import check_memory
from lymphdx.engine.performance import autocast
from lymphdx.engine.roi_readout import run_readout
from lymphdx.engine.run_data import (
    RunData,
    budget_for_nodes,
    log_node_sizes,
    resolve_manifests,
    shared_run_data,
)
from lymphdx.engine.run_folder import (
    checkpoint_path,
    load_checkpoint,
    load_model,
    open_run_dir,
    remove_new_run,
    setup_logging,
)
from lymphdx.engine.trainer import Trainer

log = logging.getLogger("lymphdx")


def _set_num_threads(config: Config, ctx: DistContext) -> None:
    """``training.num_threads``, else (several processes on a node) a share of the cores."""
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    elif ctx.local_world_size > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        torch.set_num_threads(max(1, (cores or os.cpu_count() or 1) // ctx.local_world_size))
    log.info(
        "rank %d of %d on %s, %d threads",
        ctx.rank,
        ctx.world_size,
        ctx.device,
        torch.get_num_threads(),
    )


def _terminal_warnings() -> logging.Handler | None:
    """Send lymphdx's warnings (a set corrected for its calibration, small nodes, ...) to
    stderr while ``train.log`` takes the records: with a handler set, logging's last
    resort, which prints them when there is none, stays silent. None (nothing added) when
    a handler already writes to the terminal, e.g. one of ``logging.basicConfig``."""
    for logger in (log, logging.getLogger()):
        for h in logger.handlers:
            stream = getattr(h, "stream", None)
            if not isinstance(h, logging.FileHandler) and stream in (sys.stderr, sys.stdout):
                return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("lymphdx: warning: %(message)s"))
    log.addHandler(handler)
    return handler


def _fit_readout(run_dir: Path, config: Config, data: RunData) -> None:
    """``evaluation.roi_readout``: fit the readout of the finished run's ``best`` weights
    now, so that the run folder carries it (``predict`` needs no data); logged."""
    if not (config.evaluation.roi_readout and get_strategy(config.strategy).trains_decoder):
        return
    config, model, _ = load_model(run_dir, data=data)
    # with evaluation.bn_stats re-estimated: the "found no node" switch reads the decoder
    # as it is scored
    decoder_status_with_stats(run_dir, config, model, data)
    try:
        _, note = run_readout(run_dir, config, model, data, refit=True)
    except LymphdxError as err:  # e.g. a scan unreadable now: evaluate will try again
        log.warning("ROI readout not fitted: %s", err)
        return
    log.info("ROI readout: %s", note)


def train(
    config: Config,
    run_dir: str | Path,
    weak_csv: str | Path | None = None,
    strong_csv: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    trainer: type[Trainer] = Trainer,
) -> dict[str, Any]:
    """Train one run into ``run_dir``; returns ``{"best": {...}, "epochs": n}``.

    ``trainer``: the ``Trainer`` class to run; a subclass overrides its named hooks
    (``train_epoch``, ``train_step``, ``propagation``, ``validate``, ``epoch_end``, ...).

    ``run_dir`` gets ``config.yaml`` (fully resolved), ``splits.csv``,
    ``normalization.json``, ``history.csv``, ``checkpoints/{last,best}.pt``,
    ``tensorboard/`` and ``train.log`` (its warnings also on stderr). Under ``torchrun``
    (``WORLD_SIZE`` > 1) every rank calls this; rank 0's config rules and rank 0 alone
    writes ``run_dir``.
    """
    run_dir = Path(run_dir)
    config = resolve_manifests(config, weak_csv and Path(weak_csv), strong_csv and Path(strong_csv))
    lock = contextlib.ExitStack()

    def open_folder() -> None:
        if resume and not (run_dir / "config.yaml").exists():  # before making any folder
            what = path_problem(run_dir) or "holds no run (no config.yaml)"
            raise LymphdxError(f"cannot resume: the run folder {run_dir} {what}")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = folder_problem(run_dir) or err.strerror
            raise LymphdxError(f"cannot write to the run folder {run_dir}: {reason}") from None
        lock.enter_context(run_lock(run_dir))  # one writer per run folder
        open_run_dir(config, run_dir, resume)
        if resume:  # what a killed predecessor was writing when it died
            stale.extend(remove_stale_temporaries(run_dir))

    created = not run_dir.exists()
    stale: list[Path] = []
    with distributed(config.training.device) as ctx, lock:
        config = ctx.broadcast_object(config)
        try:
            ctx.on_main(open_folder)
        except BaseException:
            if ctx.is_main and created:  # e.g. --resume of nothing: not even an empty folder
                (run_dir / ".lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
        handler = setup_logging(run_dir) if ctx.is_main else None
        terminal = _terminal_warnings() if ctx.is_main else None
        if terminal is not None:  # removed when the run ends, however it ends
            lock.callback(log.removeHandler, terminal)
        for path in stale:
            log.info("removed %s, left by an interrupted write", path)
        try:
            _set_num_threads(config, ctx)
            with autocast(config.training, ctx.device):  # refuses fp16 without CUDA now
                pass
            if config.training.memory_check:
                est = check_memory(config, ctx.device)
                if est is not None:
                    log.info("estimated peak memory of a training step: %s", est)
            strategy = get_strategy(config.strategy)
            data = shared_run_data(config, run_dir, strategy, ctx)
            if strategy.trains_decoder:
                nodes = ctx.broadcast_object(ctx.on_main(lambda: log_node_sizes(data, config)))
                config = budget_for_nodes(config, nodes, run_dir, ctx)
            loop = trainer(config, run_dir, data, ctx)
            last = checkpoint_path(run_dir, "last")
            state = ctx.on_main(lambda: load_checkpoint(last) if resume and last.exists() else None)
            state = ctx.broadcast_object(state)
            if state is not None:
                loop.restore(state)
                log.info("resumed %s at epoch %d", run_dir, loop.epoch)
        except BaseException:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
                handler = None
            if ctx.is_main and not resume:  # refused before training: leave nothing behind
                remove_new_run(run_dir, created)
            raise
        try:
            result = loop.run(progress=progress)
            ctx.on_main(lambda: _fit_readout(run_dir, config, data))
            return result
        except BaseException:
            # refused in the first epoch (e.g. a scan read only then): as above, unless an
            # epoch ended (its checkpoint makes the run resumable)
            if not resume and not checkpoint_path(run_dir, "last").exists():
                if handler is not None:
                    log.removeHandler(handler)
                    handler.close()
                    handler = None
                if ctx.is_main:
                    remove_new_run(run_dir, created)
            raise
        finally:
            # the DDP wrapper holds the process group: let it go before the group does
            del loop
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
