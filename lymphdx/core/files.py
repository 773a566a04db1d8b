"""Crash-safe file writing (write to a temporary name in the same folder, then rename), and
why a path given by a user cannot be reached (missing, a dangling link, a loop of links)."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lymphdx.core.errors import LymphdxError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary name keeps the final name's extension (``.nii.gz``, ``.csv``), so writers
    that choose a format by extension (SimpleITK) work on it. On error it is removed, so a
    reader never sees a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    So a folder of outputs that belong together (a scan's prediction) is either complete
    or absent; on error the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{uuid.uuid4().hex[:8]}-{path.name}"
    tmp.mkdir()
    try:
        yield tmp
        old = path.parent / f".old-{uuid.uuid4().hex[:8]}-{path.name}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (with parents) if needed and check that files can be
    written in it, by writing and removing a probe file (``os.access`` is wrong for root,
    ACLs and read-only mounts).

    Raises:
        LymphdxError: naming the folder and the system's reason.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".tmp-probe-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = folder_problem(path) or err.strerror or str(err)
        raise LymphdxError(f"cannot write to the {what} {str(path)!r}: {reason}") from None
    return path


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be reached, or ``None`` when it can (it exists, links followed).

    A phrase that follows the path's name, telling apart what ``Path.exists()`` lumps
    together as ``False``:
    ``"does not exist"``;
    ``"is a loop of symbolic links ('a' -> 'b' -> 'a')"``;
    ``"is a symbolic link to 'x', which does not exist"``;
    ``"lies in 'd', which is a loop of symbolic links (...)"`` (a folder above it);
    ``"lies in 'f', which is a file, not a folder"``;
    ``"cannot be reached (Permission denied)"``.
    """
    path = Path(path)
    try:
        os.stat(path)
        return None
    except OSError:
        pass
    # the first name along the path that cannot be reached: a folder above it, or itself
    for p in (*reversed(path.parents), path):
        try:
            info = os.stat(p)
        except OSError as err:
            problem = _unreachable(p, err)
            if p == path or problem == "does not exist":
                return problem
            return f"lies in {str(p)!r}, which {problem}"
        if p != path and not stat.S_ISDIR(info.st_mode):
            return f"lies in {str(p)!r}, which is a file, not a folder"
    return "cannot be reached"  # it appeared meanwhile: nothing better to say


def _unreachable(p: Path, err: OSError) -> str:
    """Why ``p``, whose parent folder can be reached, cannot be (``path_problem``)."""
    if not os.path.islink(p):
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "does not exist"
        return f"cannot be reached ({err.strerror or err})"
    chain = [str(p)]
    for _ in range(8):  # enough to show a loop; the kernel stops at 40
        try:
            target = os.readlink(chain[-1])
        except OSError:  # the end of the chain: not a link, or not there
            break
        step = os.path.normpath(os.path.join(os.path.dirname(chain[-1]), target))
        seen = step in chain
        chain.append(step)
        if seen:
            break
    links = " -> ".join(map(repr, chain))
    if err.errno == errno.ELOOP:
        return f"is a loop of symbolic links ({links})"
    if len(chain) > 2:
        links = " -> ".join(map(repr, chain[1:]))
        return f"is a symbolic link to {links}, which does not exist"
    return f"is a symbolic link to {chain[-1]!r}, which does not exist"


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder, without creating anything: ``None``
    when it is a folder or could be made one; else a short reason naming the file that is
    in the way (``path`` itself, or a folder above it that is a file, a dangling link or a
    loop of links: ``path_problem``)."""
    path = Path(path)
    for p in (path, *path.parents):
        try:
            if p.is_dir():
                return None
            if p.is_symlink() and not p.exists():
                reason = path_problem(p) or "is a symbolic link that cannot be followed"
            elif p.exists():
                reason = "is a file, not a folder"
            else:
                continue
        except OSError as err:  # a name too long, a folder that cannot be searched, ...
            return err.strerror or str(err)
        return f"it {reason}" if p == path else f"{str(p)!r} above it {reason}"
    return None


def check_folder(path: str | Path, what: str) -> Path:
    """Raise a ``LymphdxError`` naming ``what`` and ``path`` if ``path`` cannot be a folder
    (``folder_problem``); creates nothing."""
    problem = folder_problem(path)
    if problem is not None:
        raise LymphdxError(f"cannot use {str(path)!r} as the {what}: {problem}")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf: "undefined", e.g. a standard error
    from one patient per class) replaced by ``None``, so that it is valid JSON (``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any) -> str:
    """``obj`` as indented, strictly valid JSON (non-finite floats written as ``null``)."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def csv_text(
    header: Sequence[str], rows: Iterable[Sequence[Any]], lineterminator: str = "\n"
) -> str:
    """A CSV table as text: ``header``, then ``rows`` (``None`` cells written empty)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator=lineterminator)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(
    path: str | Path,
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    lineterminator: str = "\n",
) -> None:
    """Write a CSV table (``csv_text``) to ``path`` atomically, as UTF-8."""
    text = csv_text(header, rows, lineterminator)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """A CSV file's rows as ``{column: text}``; none when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; NaN and ±inf become
    ``null`` (``dumps_json``), which every JSON reader accepts."""
    write_text(path, dumps_json(obj) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files and folders that writers killed mid-write left in
    ``folder`` and its subfolders (``.tmp-*``, ``.old-*``); returns what was removed.

    Call it only while holding the folder's ``run_lock``: a live writer's temporary file
    looks the same.
    """
    removed = []
    for p in sorted(Path(folder).rglob(".tmp-*")) + sorted(Path(folder).rglob(".old-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def run_lock(folder: str | Path, purpose: str = "training") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``, ``flock``) while the block
    runs, so two processes never write one run; the kernel drops it when the holder dies
    (even by SIGKILL), so a killed run never leaves a stale lock. The lock file names the
    holder's pid and ``purpose`` (``lock_holder`` reads them)."""
    import fcntl

    path = Path(folder) / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, doing = _holder_text(os.pread(fd, 64, 0))
            raise LymphdxError(
                f"another lymphdx process (pid {pid}) is {doing} {folder}; wait for it to "
                "finish or stop it (then `lymphdx train --out FOLDER --resume`, or the same "
                "compare again, goes on from its last epoch)"
            ) from None
        held = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {purpose}".encode(), 0)
        yield
    finally:
        if held:  # a finished run leaves no .lock (removed while still held)
            with contextlib.suppress(OSError):
                path.unlink()
        os.close(fd)


def _holder_text(raw: bytes) -> tuple[str, str]:
    """``(pid, what it is doing)`` from a ``.lock`` file's text (``"<pid> <purpose>"``;
    older versions wrote the pid alone)."""
    pid, _, purpose = raw.decode(errors="replace").strip().partition(" ")
    return pid or "unknown", purpose or "writing"


def lock_holder(folder: str | Path) -> tuple[str, str, float] | None:
    """``(pid, purpose, since)`` of the process that holds ``folder``'s ``run_lock``
    (``since``: when it took it, seconds since the epoch), or ``None`` when no other
    process does (a ``.lock`` left by a killed process is not held; one this process
    holds is its own work). Takes nothing a writer could notice beyond an instant's
    shared ``flock``."""
    import fcntl

    path = Path(folder) / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no .lock: nobody holds it
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, purpose = _holder_text(os.pread(fd, 64, 0))
            return None if pid == str(os.getpid()) else (pid, purpose, os.fstat(fd).st_mtime)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
