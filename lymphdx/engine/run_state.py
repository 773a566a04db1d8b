"""Where a run folder stands: whether a process is training it now (its ``run_lock``),
how many epochs it has done, why it has no ``checkpoints/best.pt``, and whether the files
scored from its checkpoint (``metrics.json``, ``predictions_<split>.csv``,
``detection.json``, a compare's ``results.json``) still belong to its current
``best.pt``: each such file records the checkpoint it came from (``checkpoint_record``)."""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Any

import yaml

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import lock_holder, read_csv

__all__ = [
    "sha256_file",
    "weights_stamp",
    "epochs_done",
    "busy_note",
    "refuse_while_busy",
    "missing_checkpoint",
    "checkpoint_record",
    "stale_reason",
    "run_notes",
]

# training.selection values whose best.pt is written only when the last epoch ends
_WRITTEN_AT_END = ("last", "ema_last", "swa")


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes (cached while its size and mtime stay the same)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def weights_stamp(checkpoint: Path) -> dict[str, object]:
    """What a file fitted for a checkpoint records of it (name, size, mtime), so that a
    replaced checkpoint makes the file stale (the readout's, the batch-norm statistics')."""
    st = checkpoint.stat()
    return {
        "checkpoint": checkpoint.name,
        "checkpoint_size": st.st_size,
        "checkpoint_mtime_ns": st.st_mtime_ns,
    }


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _raw_config(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` as plain YAML (empty when unreadable: only for messages)."""
    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def epochs_done(run_dir: str | Path) -> tuple[int, int | None]:
    """``(epochs in history.csv, training.epochs of config.yaml or None)``."""
    run_dir = Path(run_dir)
    planned = (_raw_config(run_dir).get("training") or {}).get("epochs")
    return len(read_csv(run_dir / "history.csv")), planned if isinstance(planned, int) else None


def _progress(run_dir: Path) -> str:
    done, planned = epochs_done(run_dir)
    return f"{done} of {planned} epochs done" if planned else f"{done} epochs done"


def _busy(run_dir: Path) -> tuple[str, bool] | None:
    """``(busy_note, whether the holder is training)``, or ``None``."""
    holder = lock_holder(run_dir)
    if holder is None:
        return None
    pid, purpose, since = holder
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    if purpose == "training":
        note = f"run {run_dir} is still training (pid {pid}, since {when}; {_progress(run_dir)})"
        return note, True
    doing = "being evaluated by" if purpose == "evaluating" else "in use by"
    return f"run {run_dir} is {doing} another lymphdx process (pid {pid}, since {when})", False


def busy_note(run_dir: str | Path) -> str | None:
    """``"run X is still training (pid N, since T; 3 of 20 epochs done)"`` (or is being
    evaluated) while another process holds the run's lock; ``None`` when none does."""
    busy = _busy(Path(run_dir))
    return None if busy is None else busy[0]


def refuse_while_busy(run_dir: str | Path, action: str) -> None:
    """Refuse to ``action`` (e.g. ``"evaluate it"``) a run that another process is
    training or evaluating now: its ``best.pt`` may still change."""
    run_dir = Path(run_dir)
    busy = _busy(run_dir)
    if busy is None:
        return
    note, training = busy
    if not training:
        raise LymphdxError(f"{note}: wait for it to finish, then {action}")
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        raise LymphdxError(f"{note}, {_not_yet(run_dir)}: {action} after it finishes")
    raise LymphdxError(
        f"{note}: {action} after it finishes, since its checkpoints/best.pt may still "
        "change (history.csv shows the validation AUC so far); or stop it, "
        f"{action}, and go on later with `lymphdx train --out {run_dir} --resume`"
    )


def _not_yet(run_dir: Path) -> str:
    """When a run being trained writes its first ``best.pt``."""
    selection = (_raw_config(run_dir).get("training") or {}).get("selection")
    when = (
        f"its last epoch ends (training.selection: {selection})"
        if selection in _WRITTEN_AT_END
        else "its first epoch ends"
    )
    return f"and has not written checkpoints/best.pt yet, which it does when {when}"


def missing_checkpoint(run_dir: str | Path, which: str = "best") -> LymphdxError:
    """The error for a run without ``checkpoints/<which>.pt``: it is still training (and
    writes it later), or it never finished (and what to do)."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / f"{which}.pt"
    busy = _busy(run_dir)
    if busy is not None and busy[1] and which == "best":
        return LymphdxError(f"{busy[0]}, {_not_yet(run_dir)}: wait for it to finish")
    if busy is not None:
        return LymphdxError(f"{busy[0]}, and has no checkpoints/{which}.pt now")
    if which != "best":
        return LymphdxError(f"run {run_dir} has no checkpoint {path.relative_to(run_dir)}")
    done, planned = epochs_done(run_dir)
    selection = (_raw_config(run_dir).get("training") or {}).get("selection")
    resume = f"`lymphdx train --out {run_dir} --resume`"
    if done == 0:
        return LymphdxError(
            f"run {run_dir} never finished: it has no checkpoints/best.pt and no epoch in "
            "history.csv (it was stopped before its first epoch ended), and no process is "
            f"training it now; train it with {resume}"
        )
    if planned is None or done < planned:
        why = (
            f" (with training.selection: {selection}, best.pt is written when the last epoch ends)"
            if selection in _WRITTEN_AT_END
            else ""
        )
        return LymphdxError(
            f"run {run_dir} never finished: it has no checkpoints/best.pt{why}, it stopped "
            f"after {_progress(run_dir)}, and no process is training it now; finish it "
            f"with {resume}"
        )
    return LymphdxError(
        f"run {run_dir} has no checkpoints/best.pt although its training ended "
        f"({_progress(run_dir)}): the file is missing (removed?); restore the run folder "
        "from a copy, or train it again into a new folder"
    )


def checkpoint_record(run_dir: Path, path: Path, sha256: str, state: dict) -> dict[str, Any]:
    """What a file scored from checkpoint ``path`` (``sha256``: of its bytes; ``state``:
    its content) records of it: its name in the run folder, its SHA-256, the epoch of its
    weights, and the epochs in ``history.csv`` when it was scored."""
    best = state.get("best") or {}
    return {
        "file": path.relative_to(run_dir).as_posix() if path.is_relative_to(run_dir) else str(path),
        "sha256": sha256,
        "best_epoch": int(best["epoch"]) if "epoch" in best else None,
        "epochs_trained": epochs_done(run_dir)[0],
    }


def stale_reason(run_dir: str | Path, record: Any, written: Path) -> str | None:
    """Why ``written`` (a file scored from the run's ``best.pt``, holding ``record``: its
    ``checkpoint_record``) no longer belongs to the run's current ``checkpoints/best.pt``;
    ``None`` when it does, or when there is no ``best.pt`` to compare with (a run folder
    shared without its weights). A file without a record (written by an older lymphdx)
    is stale when it is older than ``best.pt``."""
    run_dir = Path(run_dir)
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        return None
    if isinstance(record, dict) and isinstance(record.get("sha256"), str):
        if record["sha256"] == sha256_file(best):
            return None
        return (
            f"{written} was scored from an earlier checkpoints/best.pt of run {run_dir} "
            f"(epoch {record.get('best_epoch')}, sha256 {record['sha256'][:12]}…), which "
            "training has replaced since"
        )
    if written.is_file() and best.stat().st_mtime > written.stat().st_mtime:
        return (
            f"{written} records no checkpoint (an older lymphdx wrote it) and is older than "
            f"the checkpoints/best.pt of run {run_dir}"
        )
    return None


def run_notes(run_dir: str | Path, record: Any, written: Path) -> list[str]:
    """What a reader of ``written``'s scores must know about the run: another process is
    training it, the scores are stale (``stale_reason``), or its training stopped before
    its last epoch and no process goes on with it (the scores are an unfinished run's)."""
    run_dir = Path(run_dir)
    busy = busy_note(run_dir)
    notes = [n for n in (busy, stale_reason(run_dir, record, written)) if n]
    done, planned = epochs_done(run_dir)
    if busy is None and planned and 0 < done < planned:
        notes.append(
            f"run {run_dir} stopped after {done} of {planned} epochs and no process is "
            f"training it: finish it with `lymphdx train --out {run_dir} --resume`, then "
            "evaluate it again"
        )
    return notes
