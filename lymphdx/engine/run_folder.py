"""A run folder on disk: its ``config.yaml`` (and how two configs differ), checkpoints
(written atomically, loaded safely, verified against the run's config, manifests and
splits), ``history.csv``, ``train.log``, and the model a finished run holds."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import lymphdx
from lymphdx.core.config import Config, dump_config, validate
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import (
    atomic_path,
    path_problem,
    read_csv,
    remove_stale_temporaries,
    write_csv,
    write_text,
)
from lymphdx.engine import selection
from lymphdx.engine.domain_stats import apply_domain_stats
from lymphdx.engine.propagation import PseudoLabels
from lymphdx.engine.pseudo_store import read_round
from lymphdx.engine.run_data import RunData
from lymphdx.engine.run_state import checkpoint_record, missing_checkpoint
from lymphdx.models.multitask import MultiTaskNet, build_model

log = logging.getLogger("lymphdx")

HISTORY_FIELDS = [
    "epoch",
    "loss",
    "loss_cls",
    "loss_roi",
    "loss_pseudo_cls",
    "loss_pseudo_roi",
    "val_auc",
    "val_loss",
    "strong_val_dice",
    "propagated",
    "pseudo_pos_fraction",
    "pseudo_kept_fraction",
    "pseudo_weight_mean",
    "pseudo_mask_voxel_fraction",
    "pseudo_mask_weighted_fraction",
    "lr",
    "seconds",
    "step",
    "phase",
    "pseudo_mask_nonempty",
    "propagation_note",
    "bag_peak_prob_weak",  # training.sampler tiles: the mean ROI probability of the bags'
    "bag_peak_prob_strong",  # peaks at a refresh
    "gate_dice",  # propagation's Dice gate: the teacher's Dice on all strong train + val
    "gate_scans",  # scans, and how many
]


class TrainingError(LymphdxError):
    """Training cannot go on (e.g. a loss became NaN); the last good checkpoint is kept."""


def config_differences(saved: Config, new: Config, weights_only: bool = False) -> list[str]:
    """Keys whose values differ between two configs, ignoring ``training.epochs`` (a run may
    be extended), ``data.cache_dir`` (where the cache lives changes no result),
    ``training.device`` (a run may go on on another machine),
    ``evaluation.declared_effect`` (the table's design analysis) and the ``compare``
    section (which executor trains it); with ``weights_only`` also
    the ``evaluation`` and ``inference`` sections, which change how a model is scored, not
    the model (``evaluation.inferer`` also scores training's validation and propagation,
    but a trained run may be scored by either)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    # evaluation.declared_effect is read by compare's table only, never by a run
    ignore = {"training.epochs", "data.cache_dir", "training.device", "evaluation.declared_effect"}
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore
        and not k.startswith("compare.")  # where compare trains a run, not what it trains
        and not (weights_only and k.startswith(("evaluation.", "inference.")))
        and a.get(k) != b.get(k)
    ]


def checkpoint_path(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary name and rename it onto ``path``; a failed write
    (full disk, lost mount) leaves the previous checkpoint intact and says so."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as err:
        raise TrainingError(
            f"cannot write checkpoint {path}: {err.strerror or err}; training stopped, the "
            f"previous {path.name} (if any) is intact; free space, then `lymphdx train --out "
            f"{path.parent.parent} --resume` (or run the same compare again, which resumes it)"
        ) from None


def _unreadable(path: Path) -> str | None:
    """Why ``path`` is no checkpoint lymphdx wrote, told from its first bytes before any
    unpickling (``torch.save`` writes a zip archive); ``None`` when it may be one."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        if zipfile.is_zipfile(path):
            return None
        return f"a damaged or truncated PyTorch archive of {size} bytes: an incomplete copy?"
    if head[:1] == b"\x80":  # a pickle's protocol opcode: torch's legacy format, or any pickle
        return (
            "a plain pickle, not a torch.save archive; it was not unpickled, as a pickle "
            "can run code"
        )
    return "unrecognised content, not a PyTorch checkpoint archive"


def _blocked_globals(err: Exception) -> list[str]:
    """The callables (``module.name``) that PyTorch's safe unpickler refused to load."""
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))


def read_checkpoint(path: Path) -> tuple[dict[str, Any], str]:
    """A lymphdx checkpoint (a ``dict`` with ``model`` and ``config_yaml``) and the SHA-256
    of the bytes it was read from (one read, so the two always belong together).

    Loaded safely: only tensors and plain data (``weights_only=True``); a file that holds
    anything else (a pickled callable that could run code) is refused, never loaded.

    Raises:
        LymphdxError: naming the file and what it is instead.
    """
    if not path.is_file():
        raise LymphdxError(f"no checkpoint at {path}")
    problem = _unreadable(path)
    if problem is not None:
        raise LymphdxError(f"{path} is not a lymphdx checkpoint ({problem}); refused")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():  # torch's advice on pickle protocols: not for users
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors of many kinds
        blocked = _blocked_globals(err)
        if blocked:
            raise LymphdxError(
                f"{path} holds executable objects ({', '.join(blocked)}); refused without "
                "running them: a lymphdx checkpoint holds only tensors and plain data, so "
                "this file was made by something else; do not use it"
            ) from None
        # PyTorch's text can advise loading with weights_only=False: never passed on
        reason = str(err).split(". ")[0].splitlines()[0] if str(err).strip() else ""
        if not reason or "weights" in reason.lower():
            reason = type(err).__name__
        raise LymphdxError(
            f"{path} is not a lymphdx checkpoint (a damaged or foreign PyTorch file: "
            f"{reason}); refused"
        ) from None
    missing = (
        [k for k in ("model", "config_yaml") if k not in state] if isinstance(state, dict) else None
    )
    if missing is None or missing or not isinstance(state["model"], dict):
        what = (
            f"a {type(state).__name__}"
            if not isinstance(state, dict)
            else f"a mapping of {', '.join(map(str, list(state)[:6])) or 'nothing'}"
        )
        raise LymphdxError(
            f"{path} is not a lymphdx checkpoint (a PyTorch file holding {what}, not the "
            "weights ('model') and config ('config_yaml') lymphdx writes); refused"
        )
    return state, hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a lymphdx checkpoint safely (``read_checkpoint``)."""
    return read_checkpoint(path)[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(config: Config, run_dir: Path) -> dict[str, str]:
    """SHA-256 of what a checkpoint was trained from: both manifests and ``splits.csv``."""
    out: dict[str, str] = {}
    for key, path in (
        ("weak manifest", config.manifests.weak),
        ("strong manifest", config.manifests.strong),
        ("splits.csv", run_dir / "splits.csv"),
    ):
        if path is not None and Path(path).exists():
            out[key] = _sha256(Path(path))
    return out


def verify_checkpoint(
    state: dict[str, Any], config: Config, run_dir: Path, action: str, resume: bool = False
) -> None:
    """Refuse a checkpoint whose config, lymphdx version (major.minor), manifests or splits
    differ from the run's, saying what differs. ``resume``: also the manifests' content
    (evaluation and prediction may run where the training data is not)."""
    problems: list[str] = []
    saved_version = str(state.get("lymphdx_version", "unknown"))
    if saved_version.split(".")[:2] != lymphdx.__version__.split(".")[:2]:
        problems.append(
            f"the checkpoint was written by lymphdx {saved_version}, this is {lymphdx.__version__}"
        )
    try:
        saved = validate(yaml.safe_load(state.get("config_yaml", "")), "checkpoint config")
    except LymphdxError as err:
        problems.append(f"the checkpoint's recorded config is unreadable ({err})")
    else:
        differ = config_differences(saved, config, weights_only=True)
        if differ:
            problems.append(
                f"the checkpoint's config differs from the run's config.yaml "
                f"(checkpoint -> run: {'; '.join(differ)})"
            )
    recorded = state.get("fingerprint")
    if recorded is None:
        problems.append("the checkpoint records no fingerprint of its manifests and splits")
    else:
        now = run_fingerprint(config, run_dir)
        for key, digest in recorded.items():
            if key not in now:
                if key == "splits.csv" or resume:
                    problems.append(f"the run's {key} is missing")
            elif now[key] != digest:
                if key == "splits.csv" or resume:
                    problems.append(
                        f"the {key} changed since the checkpoint was written "
                        f"(sha256 {digest[:12]}… → {now[key][:12]}…)"
                    )
    if problems:
        raise LymphdxError(f"{action}: {'; '.join(problems)}")


def pseudo_to_state(p: PseudoLabels) -> dict[str, Any]:
    """The checkpoint's record of the pseudo-labels: tensors, except the weak masks of
    scans of their own sizes, which live in ``RUN/pseudo/`` and are named by their round
    (``weak_store``)."""

    def t(a: Any) -> Any:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    stored = p.weak_store is not None
    return {
        "epoch": p.epoch,
        "strong_targets": t(p.strong_targets),
        "strong_weights": t(p.strong_weights),
        "weak_masks": None if stored else t(p.weak_masks),
        "weak_mask_weights": None if stored else t(p.weak_mask_weights),
        "weak_store": p.weak_store,
    }


def pseudo_from_state(d: dict[str, Any], run_dir: Path) -> PseudoLabels:
    """``pseudo_to_state``'s inverse; masks in ``run_dir/pseudo/`` come memory-mapped."""

    def a(x: Any) -> Any:
        if isinstance(x, list):  # checkpoints written before RUN/pseudo/
            return [t.numpy() for t in x]
        return None if x is None else x.numpy()

    store = d.get("weak_store")
    if store is not None:
        masks, weights = read_round(run_dir, store)
    else:
        masks, weights = a(d["weak_masks"]), a(d.get("weak_mask_weights"))
    return PseudoLabels(
        a(d["strong_targets"]), a(d["strong_weights"]), masks, d["epoch"], weights, store
    )


def setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """``history.csv``: one row per epoch (``HISTORY_FIELDS``; missing values empty)."""
    write_csv(path, HISTORY_FIELDS, ([r.get(k) for k in HISTORY_FIELDS] for r in rows), "\r\n")


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``history.csv`` as strings (none when it does not exist)."""
    return read_csv(path)


# read only after the last epoch (the readout is fitted then; the rest by evaluate), so a
# resumed run may take new values, e.g. from a preset changed while it was interrupted;
# evaluation.inferer and tta_flip, and inference.*, steer training's validation,
# propagation and bags, and may not change
AFTER_TRAINING = tuple(
    f"evaluation.{k}"
    for k in (
        "roi_readout",
        "readout",
        "readout_weight",
        "bn_stats",
        "bootstrap",
        "ci",
        "threshold",
        "calibration",
        "operating_point",
    )
)


def open_run_dir(config: Config, run_dir: Path, resume: bool) -> None:
    """Check that ``run_dir`` may take this run (or resume it, with only ``training.epochs``
    and the settings read after training, ``AFTER_TRAINING``, changed); write
    ``config.yaml``."""
    config_path = run_dir / "config.yaml"
    if resume:
        if not config_path.exists():
            raise LymphdxError(f"cannot resume: {run_dir} holds no run (no config.yaml)")
        saved = validate(yaml.safe_load(config_path.read_text()), str(config_path))
        differ = [
            d
            for d in config_differences(saved, config)
            if not d.split(":")[0].startswith(AFTER_TRAINING)
        ]
        if differ:
            raise LymphdxError(
                f"cannot resume {run_dir}: the config differs from the run's config.yaml "
                f"({'; '.join(differ)}); resume without --config, or with the same one "
                "(only training.epochs may change, to extend a run)"
            )
    elif config_path.exists():
        raise LymphdxError(f"{run_dir} already holds a run; use --resume, or another --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(config_path, dump_config(config))
    except OSError as err:
        raise LymphdxError(f"cannot write to the run folder {run_dir}: {err.strerror}") from None


def remove_new_run(run_dir: Path, created: bool) -> None:
    """Undo a new run that was refused before its first epoch ended: the files it wrote,
    and the folder if it made it (so the same command can be retried once the data or the
    config is fixed, with no "already holds a run" and nothing for ``--resume`` to replay)."""
    names = ("config.yaml", "splits.csv", "normalization.json", "train.log", "history.csv")
    for name in (*names, selection.VAL_PREDICTIONS, ".lock"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    checkpoints = run_dir / "checkpoints"
    for name in ("best.pt", "last.pt", "epoch_000.pt"):  # the first epoch's, if any
        (checkpoints / name).unlink(missing_ok=True)
    remove_stale_temporaries(run_dir)
    with contextlib.suppress(OSError):
        checkpoints.rmdir()  # only if nothing else is in it
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if nothing else is in it


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved ``config.yaml`` of a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        problem = path_problem(run_dir) or "is not a lymphdx run folder (no config.yaml)"
        raise LymphdxError(f"{run_dir} {problem}")
    return validate(yaml.safe_load(path.read_text()), str(path))


def load_model(
    run_dir: str | Path, which: str = "best", data: RunData | None = None
) -> tuple[Config, MultiTaskNet, dict]:
    """Config, model (eval mode) and checkpoint state of a run; the state's ``source`` is
    the ``checkpoint_record`` (file, SHA-256, epoch) that files scored from it record.
    A run without the checkpoint is told apart: still training, or never finished.
    With ``evaluation.bn_stats: per_hospital`` the model carries each hospital's batch-norm
    statistics (``engine.domain_stats``; estimated on ``data``'s training scans when the
    run has none stored for these weights, ``data`` loaded when ``None``)."""
    config = load_run_config(run_dir)
    path = Path(run_dir) / "checkpoints" / f"{which}.pt"
    if not path.exists():
        raise missing_checkpoint(run_dir, which)
    state, sha = read_checkpoint(path)
    verify_checkpoint(state, config, Path(run_dir), f"cannot use the {which} model of {run_dir}")
    model = build_model(config.model)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as err:  # other layers, other shapes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LymphdxError(
            f"{path} does not hold weights of the model its config describes ({first})"
        ) from None
    model.eval()
    state["source"] = checkpoint_record(Path(run_dir), path, sha, state)
    apply_domain_stats(Path(run_dir), config, model, which, data)
    return config, model, state
