"""One trainer for the four strategies (a strategy is a row of flags, see ``strategies``).

The loop, in named steps (paper §3.2):
    for each epoch:
        propagation (when due): pseudo class labels for the strong set, pseudo ROI masks
            for the weak set, from the current model;
        joint training on real + propagated labels, batches drawn from both sets as the
            strategy needs;
        validation on the weak set's validation split (AUC, BCE) → model selection;
        history row, TensorBoard scalars, checkpoints ``last`` and (if better) ``best``.
Everything random depends only on (seed, epoch, step), so ``--resume`` from ``last``
replays the same run.

Issue 8's options (config; all off by default): an EMA teacher updated after every
optimiser step that labels the other set (``propagation.teacher``) and may be the
selected model; graph label propagation, a curriculum and weighted pseudo masks
(``propagation``); domain-specific batch norm (``model.norm: domain_batch``: weak scans
in domain 0, strong in 1); and the choice of the weights in ``best`` (``training.selection``:
best validation AUC of the student or of the EMA, SWA of the last epochs, or the last
epoch; see ``selection``).

Under ``torchrun`` the same loop runs on every rank (see ``distributed``): each rank
trains on its block of every global batch, propagation and validation are split across
the ranks and gathered, and rank 0 alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io as _io
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

import lymphdx
from lymphdx.core.config import Config, dump_config, validate
from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import (
    atomic_path,
    folder_problem,
    remove_stale_temporaries,
    run_lock,
    write_text,
)
from lymphdx.core.strategies import Strategy, get_strategy
from lymphdx.data.augment import Augmenter
from lymphdx.data.datasets import VolumeSet, epoch_order
from lymphdx.data.manifest import (
    StrongRecord,
    WeakRecord,
    check_duplicate_scans,
    load_manifests,
    resolve_splits,
)
from lymphdx.data.preprocess import (
    Normalizer,
    PreprocessCache,
    check_calibration,
    fit_normalizers,
    load_normalizers,
    save_normalizers,
)
from lymphdx.data.sampling import crop, patch_corner, stream_batches
from lymphdx.engine import selection
from lymphdx.engine.distributed import (
    DistContext,
    batch_classification_loss,
    batch_masked_roi_loss,
    batch_roi_loss,
    distributed,
)
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.memory import check_memory
from lymphdx.engine.performance import autocast, grad_scaler, optimizer_step, prepare_input
from lymphdx.engine.propagation import (
    PseudoLabels,
    is_propagation_epoch,
    predict_probabilities,
    propagate_labels,
    propagate_labels_graph,
    propagate_mask_targets,
    propagation_round,
)
from lymphdx.engine.roi_status import node_size_status, roi_decoder_status
from lymphdx.engine.teacher import EmaTeacher, SwaAverager, update_bn
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import MultiTaskNet, build_model
from lymphdx.stats.metrics import auc as compute_auc

__all__ = [
    "config_differences",
    "resolve_manifests",
    "run_fingerprint",
    "verify_checkpoint",
    "RunData",
    "load_run_data",
    "train",
    "load_checkpoint",
    "cache_dir_of",
    "TrainingError",
]

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
]


class TrainingError(LymphdxError):
    """Training cannot go on (e.g. a loss became NaN); the last good checkpoint is kept."""


def config_differences(saved: Config, new: Config, weights_only: bool = False) -> list[str]:
    """Keys whose values differ between two configs, ignoring ``training.epochs`` (a run may
    be extended), ``data.cache_dir`` (where the cache lives changes no result) and
    ``training.device`` (a run may go on on another machine); with ``weights_only`` also
    the ``evaluation`` section, which changes how a model is scored, not the model."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    ignore = {"training.epochs", "data.cache_dir", "training.device"}
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore
        and not (weights_only and k.startswith("evaluation."))
        and a.get(k) != b.get(k)
    ]


def cache_dir_of(config: Config) -> Path:
    """The preprocessing cache folder: config, else $LYMPHDX_CACHE, else ~/.cache/lymphdx."""
    if config.data.cache_dir:
        return Path(config.data.cache_dir)
    return Path(os.environ.get("LYMPHDX_CACHE", Path.home() / ".cache" / "lymphdx"))


@dataclass
class RunData:
    """Records of both sets with splits, the cache and the per-domain normalisers."""

    weak: list[WeakRecord]
    strong: list[StrongRecord]
    cache: PreprocessCache
    normalizers: dict[str, Normalizer]
    _sets: dict[tuple[str, str, bool], VolumeSet] = field(default_factory=dict)

    def volumes(self, domain: str, split: str, masks: bool = False) -> VolumeSet:
        """The volumes of ``domain`` (``weak``/``strong``) in ``split``, built once."""
        key = (domain, split, masks)
        if key not in self._sets:
            records = self.weak if domain == "weak" else self.strong
            chosen = [r for r in records if r.split == split]
            self._sets[key] = VolumeSet(chosen, self.cache, self.normalizers[domain], masks)
        return self._sets[key]


def split_manifests(
    config: Config,
    weak_csv: str | Path,
    strong_csv: str | Path,
    run_dir: Path,
    duplicates: tuple[PreprocessCache, bool] | None = None,
) -> tuple[list[WeakRecord], list[StrongRecord]]:
    """Both manifests' records with their splits: ``run_dir/splits.csv`` if it exists,
    else the manifests' or a seeded split (``config.data``), then written there.
    ``duplicates`` ``(cache, with_strong)``: first refuse scans of identical content under
    two patient ids (``check_duplicate_scans``; the strong set's too when ``with_strong``)."""
    weak, strong = load_manifests(weak_csv, strong_csv)
    if duplicates is not None:
        cache, with_strong = duplicates
        check_duplicate_scans(weak, strong if with_strong else [], cache.content_hash)
    return resolve_splits(
        weak,
        strong,
        run_dir,
        config.data.split.weak,
        config.data.split.strong,
        config.data.split_seed,
    )


def _check_strong_masks(
    cache: PreprocessCache, strong: list[StrongRecord], manifest: str | Path
) -> None:
    """Read the masks training will use (train and val) now, so that a bad one is refused
    before the first epoch, and refuse a training split whose masks are all empty.

    All empty is refused, not warned about: the strong set is there only to teach the ROI
    decoder, and with no node voxel anywhere every strategy with an ROI loss trains it on
    background alone, propagates empty pseudo masks and still reports ordinary-looking
    results. Strategies that use no masks (supervised, semi-supervised) never get here.
    """
    infos = {}
    for r in strong:
        if r.split in ("train", "val"):
            infos[r.patient_id] = cache.mask_info(r.mask, r.image, r.patient_id)
    train = [r for r in strong if r.split == "train"]
    if not train or any(infos[r.patient_id]["foreground_mm3"] > 0 for r in train):
        return
    outside = [r.patient_id for r in train if infos[r.patient_id]["source_foreground_mm3"] > 0]
    if outside:
        why = (
            f"{len(outside)} of them mark nodes, but only outside the model's input grid "
            f"(data.spacing x data.shape around each scan's centre; e.g. patient "
            f"{outside[0]!r}): enlarge data.shape or data.spacing, or use data.fit: resize."
        )
    else:
        why = (
            "the mask files hold only zeros: are they the right files (not the images, "
            "not empty templates), with nodes as nonzero labels?"
        )
    raise InputError(
        f"the strong set's {len(train)} training masks are all empty: no voxel of the "
        f"model's input is a node, so the ROI task would learn background alone; {why} "
        "(The strategies supervised and semi-supervised use no masks.)",
        manifest,
        train[0].patient_id,
    )


def load_run_data(config: Config, run_dir: Path, need_strong: bool = True) -> RunData:
    """Manifests, splits (``splits.csv``), cache and normalisers (``normalization.json``).

    Before the splits are written: scans of identical content under two patient ids are
    refused (``check_duplicate_scans``). Then each set's intensity calibration is checked
    (``check_calibration``) and, for a strategy with the strong set's ROI loss, the strong
    masks of train and val are read and all-empty ones refused (``_check_strong_masks``).
    ``need_strong``: whether the strong set is used (else only the weak set is checked).
    """
    if not config.manifests.weak or not config.manifests.strong:
        raise LymphdxError("the config names no manifests (manifests.weak / manifests.strong)")
    weak_csv, strong_csv = Path(config.manifests.weak), Path(config.manifests.strong)
    cache = PreprocessCache(cache_dir_of(config), config.data)
    weak, strong = split_manifests(config, weak_csv, strong_csv, run_dir, (cache, need_strong))
    for split in ("train", "val"):
        labels = {r.label for r in weak if r.split == split}
        if labels != {0, 1}:
            raise LymphdxError(
                f"the weak set's {split} split of {config.manifests.weak} holds "
                f"{'no patients' if not labels else 'only label ' + str(labels.pop())}: "
                "AUC-based model selection needs both classes; give a split column with "
                "positives and negatives in every split, or more patients"
            )
    sets = {"weak": [(r.patient_id, r.image) for r in weak]}
    if need_strong:
        sets["strong"] = [(r.patient_id, r.image) for r in strong]
    check_calibration(cache, sets, {"weak": weak_csv, "strong": strong_csv})
    if need_strong and get_strategy(config.strategy).roi_strong:
        _check_strong_masks(cache, strong, strong_csv)
    norm_path = run_dir / "normalization.json"
    if norm_path.exists():
        normalizers = load_normalizers(norm_path)
    else:
        domains = {"weak": [r.image for r in weak if r.split == "train"]}
        domains["strong"] = [r.image for r in strong if r.split == "train"] if need_strong else []
        if not domains["strong"]:
            domains.pop("strong")
        normalizers = fit_normalizers(cache, domains, check=False)  # checked above
        if "strong" not in normalizers:  # never used; recorded so the file is complete
            normalizers["strong"] = normalizers["weak"]
        save_normalizers(norm_path, normalizers)
    return RunData(weak, strong, cache, normalizers)


def _checkpoint_path(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary name and rename it onto ``path``; a failed write
    (full disk, lost mount) leaves the previous checkpoint intact and says so."""
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as err:
        raise TrainingError(
            f"cannot write checkpoint {path}: {err.strerror or err}; training stopped, the "
            f"previous {path.name} (if any) is intact; free space and --resume"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only: ``weights_only=True``)."""
    if not path.exists():
        raise LymphdxError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors of many kinds
        raise LymphdxError(f"cannot load checkpoint {path}: {err}") from None


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


def _pseudo_to_state(p: PseudoLabels) -> dict[str, Any]:
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return {
        "epoch": p.epoch,
        "strong_targets": t(p.strong_targets),
        "strong_weights": t(p.strong_weights),
        "weak_masks": t(p.weak_masks),
        "weak_mask_weights": t(p.weak_mask_weights),
    }


def _pseudo_from_state(d: dict[str, Any]) -> PseudoLabels:
    def a(x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else x.numpy()

    return PseudoLabels(
        a(d["strong_targets"]),
        a(d["strong_weights"]),
        a(d["weak_masks"]),
        d["epoch"],
        a(d.get("weak_mask_weights")),
    )


def _setup_logging(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_FIELDS})
    write_text(path, buf.getvalue())


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``history.csv`` as strings (none when it does not exist)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def _strong_dice(
    model: MultiTaskNet, volumes: VolumeSet, threshold: float, ctx: DistContext
) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    index = ctx.shard(range(len(volumes)))  # each rank scores its block
    inter = total = 0.0
    with domains(model, STRONG):
        for start in range(0, len(index), 4):
            batch = volumes.batch(index[start : start + 4])
            pred = torch.sigmoid(model(batch.images.to(device))["roi"]).cpu() > threshold
            target = batch.masks > 0
            inter += float((pred & target).sum())
            total += float(pred.sum() + target.sum())
    model.train(was_training)
    inter, total = ctx.all_gather_array(np.array([[inter, total]])).sum(axis=0)
    return 1.0 if total == 0 else float(2 * inter / total)


def maps_and_targets(
    out: dict[str, torch.Tensor], suffix: str, items: slice, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The map logits that the ROI masks teach, stacked as one batch, with their targets:
    ``out["roi" + suffix][items]`` ``(b, 1, D, H, W)``, and the malignancy map's after it
    when the model has one (``2b`` items, ``targets`` ``(b, 1, D, H, W)`` repeated).
    Returns (logits, targets, number of maps)."""
    maps = [out["roi" + suffix]]
    if "malignancy" + suffix in out:
        maps.append(out["malignancy" + suffix])
    logits = torch.cat([m[items] for m in maps])
    return logits, torch.cat([targets] * len(maps)), len(maps)


class StepModule(torch.nn.Module):
    """One training step's forward passes as one module call, so that DDP sees a single
    forward: whole scans ``images`` ``(B, 1, D, H, W)`` (``MultiTaskNet.forward`` with
    ``roi``) and, when given, ROI patches ``(P, 1, d, h, w)`` decoded under ``roi_patch``."""

    def __init__(self, model: MultiTaskNet) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: torch.Tensor | None,
        roi: bool | slice,
        patches: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = {} if images is None else dict(self.model(images, roi=roi))
        if patches is not None:
            maps = self.model(patches, roi=True)
            out["roi_patch"] = maps["roi"]
            if "malignancy" in maps:
                out["malignancy_patch"] = maps["malignancy"]
        return out


class _Trainer:
    """State of one training run; ``run()`` is the loop of the module docstring."""

    def __init__(
        self, config: Config, run_dir: Path, data: RunData, ctx: DistContext | None = None
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.data = data
        self.ctx = ctx or DistContext()
        self.strategy: Strategy = get_strategy(config.strategy)
        torch.manual_seed(config.seed)
        model = build_model(config.model)
        # the decoder learns from masks, or from scan labels through the attention pooling
        self.decoder_trained = self.strategy.trains_decoder or model.classifier.attention
        if not self.decoder_trained:  # it never gets a gradient; DDP must know
            model.decoder.requires_grad_(False)
        elif not self.strategy.trains_decoder and model.decoder.attention_head is not None:
            model.decoder.head[-1].requires_grad_(False)  # the ROI map's conv: masks only
        model = model.to(self.ctx.device)
        self.domain_bn = config.model.norm == "domain_batch"
        if self.ctx.is_distributed and self.ctx.device.type == "cuda" and not self.domain_bn:
            # batch statistics over the global batch; SyncBatchNorm runs on GPUs only, so
            # on CPU each rank normalises its block by its own statistics. Not with DSBN:
            # a rank without scans of a domain would skip that domain's collective.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        tcfg = config.training
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.model: MultiTaskNet = model  # the bare module: checkpoints, propagation, validation
        # ROI warm-up epochs give the classifier no gradient
        self.roi_warmup = config.training.roi_warmup_epochs if self.strategy.roi_strong else 0
        # what train_step calls: DDP when distributed, compiled when configured
        self.train_model = self.ctx.wrap(
            StepModule(self.model), find_unused=self.domain_bn or self.roi_warmup > 0
        )
        if tcfg.compile:
            self.train_model = torch.compile(self.train_model, dynamic=False)
        self.scaler = grad_scaler(tcfg, self.ctx.device)
        optimizer = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(
            self.model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay
        )
        self.augmenter = Augmenter(tcfg.augmentation) if tcfg.augmentation.enabled else None
        self._foreground: dict[int, np.ndarray] = {}  # strong training scan -> node voxels
        self.roi_loss = RoiLoss()
        self.weak_train = data.volumes("weak", "train")
        self.weak_val = data.volumes("weak", "val")
        self.strong_train = (
            data.volumes("strong", "train", masks=self.strategy.roi_strong)
            if self.strategy.uses_strong
            else None
        )
        self.patch = (  # (d, h, w), cut to the volumes' grid
            None
            if tcfg.roi_patch is None
            else tuple(
                min(p, s)
                for p, s in zip(reversed(tcfg.roi_patch), self.weak_train.shape, strict=True)
            )
        )
        self.strong_val = (
            data.volumes("strong", "val", masks=True) if self.strategy.roi_strong else None
        )
        self.pseudo = PseudoLabels()
        self.propagation_start: int | None = None  # the epoch of the first propagation
        self.propagation_note = ""  # why propagation did (not) run this epoch
        self.steps_done = 0  # optimiser steps so far
        self.epoch = 0
        self.best: dict[str, float] = {"val_auc": -1.0, "val_loss": math.inf, "epoch": -1}
        self.history: list[dict[str, Any]] = []
        self.val_predictions: list[dict[str, Any]] = []  # one row per epoch and patient
        # the mean teacher: it labels the other set and/or is the selected model
        self.ema = (
            EmaTeacher(self.model, tcfg.ema_decay)
            if config.propagation.teacher == "ema" or tcfg.selection in ("ema", "ema_last")
            else None
        )
        self.swa: SwaAverager | None = None  # built at the first epoch of its window
        self.swa_first = -1  # the first epoch in the SWA average
        self._check_blocks()
        first = max(config.propagation.warmup_epochs, self.roi_warmup)
        if self.strategy.propagates and tcfg.epochs <= first:
            log.warning(
                "%s trains %d epochs but propagation starts at epoch %d at the earliest "
                "(propagation.warmup_epochs, training.roi_warmup_epochs): it will never "
                "propagate, i.e. train as %s",
                config.strategy,
                tcfg.epochs,
                first,
                "multitask" if self.strategy.roi_strong else "supervised",
            )
        if self.domain_bn:
            per_rank = min(tcfg.batch_size, tcfg.strong_batch_size) // self.ctx.world_size
            if per_rank < 2:
                log.warning(
                    "model.norm domain_batch with %d scan(s) of a domain per process and step: "
                    "a domain with fewer than 2 scans in a batch is normalised with its running "
                    "statistics and does not update them",
                    per_rank,
                )

    @property
    def selected_model(self) -> MultiTaskNet:
        """The model that validation scores and ``best`` holds (until SWA at the end)."""
        if self.config.training.selection in ("ema", "ema_last"):
            assert self.ema is not None
            return self.ema.module  # type: ignore[return-value]
        return self.model

    @property
    def teacher(self) -> MultiTaskNet:
        """The model that makes the pseudo-labels (``propagation.teacher``)."""
        if self.config.propagation.teacher == "ema":
            assert self.ema is not None
            return self.ema.module  # type: ignore[return-value]
        return self.model

    def _check_blocks(self) -> None:
        """Every rank needs at least one scan of every global batch."""
        world, tcfg = self.ctx.world_size, self.config.training
        if world == 1:
            return
        need = [("training.batch_size", tcfg.batch_size, "weak", len(self.weak_train))]
        if self.strong_train is not None:
            need.append(
                (
                    "training.strong_batch_size",
                    tcfg.strong_batch_size,
                    "strong",
                    len(self.strong_train),
                )
            )
            if tcfg.pseudo_cls_batch_size is not None and self.strategy.pseudo_cls_strong:
                need.append(
                    (
                        "training.pseudo_cls_batch_size",
                        tcfg.pseudo_cls_batch_size,
                        "strong",
                        len(self.strong_train),
                    )
                )
        for key, size, name, n in need:
            if min(size, n) < world:
                raise LymphdxError(
                    f"{key} = {size} is the global batch, split across the {world} processes, "
                    f"and the {name} set's training split holds {n} scans: both must be at "
                    f"least {world}, so that every process gets a scan of every batch"
                )

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything ``--resume`` needs; ``model`` holds the student's weights."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best": dict(self.best),
            "pseudo": _pseudo_to_state(self.pseudo),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "swa": None
            if self.swa is None
            else {**self.swa.state_dict(), "first_epoch": self.swa_first},
            "selection": self.config.training.selection,
            "propagation_start": self.propagation_start,
            "steps_done": self.steps_done,
            "config_yaml": dump_config(self.config),
            "lymphdx_version": lymphdx.__version__,
            "fingerprint": run_fingerprint(self.config, self.run_dir),
        }

    def restore(self, state: dict[str, Any]) -> None:
        verify_checkpoint(
            state, self.config, self.run_dir, f"cannot resume {self.run_dir}", resume=True
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best = dict(state["best"])
        self.pseudo = _pseudo_from_state(state["pseudo"])
        start = state.get("propagation_start")
        self.propagation_start = None if start is None else int(start)
        self.steps_done = int(state.get("steps_done", 0))
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if state.get("swa") is not None:
            self.swa = SwaAverager(self.model)
            self.swa.load_state_dict(state["swa"])
            self.swa_first = int(state["swa"]["first_epoch"])
        self.history = [
            r for r in read_history(self.run_dir / "history.csv") if int(r["epoch"]) < self.epoch
        ]
        self.val_predictions = [
            r
            for r in selection.read_val_predictions(self.run_dir / selection.VAL_PREDICTIONS)
            if int(r["epoch"]) < self.epoch
        ]

    # -- the named steps ---------------------------------------------------------------
    def propagation_due(self) -> bool:
        """Whether this epoch starts with a propagation; sets ``propagation_note`` to why
        (not). The first waits for ``propagation.warmup_epochs`` (and the ROI warm-up),
        and, with ``propagation.dice_gate``, for the decoder: the last epoch's
        strong-validation Dice must have reached the gate."""
        cfg = self.config.propagation
        self.propagation_note = ""
        if not self.strategy.propagates:
            return False
        if self.propagation_start is not None:
            return is_propagation_epoch(self.epoch, cfg, self.propagation_start)
        first = max(cfg.warmup_epochs, self.roi_warmup)
        if self.epoch < first:
            self.propagation_note = f"warm-up until epoch {first}"
            return False
        gate = cfg.dice_gate if self.strategy.roi_strong else None
        if gate is None:
            self.propagation_note = f"started at epoch {first} (propagation.warmup_epochs)"
        else:
            # the epochs the gate reads: the last one, or (latched) all so far; a resumed
            # history holds strings, and "" where an epoch had no strong validation
            rows = self.history if cfg.dice_gate_latch else self.history[-1:]
            dices = [
                float(r["strong_val_dice"])
                for r in rows
                if r.get("strong_val_dice") not in (None, "")
            ]
            dice = max(dices) if dices else None
            what = "best strong-val Dice so far" if cfg.dice_gate_latch else "strong-val Dice"
            if dice is None or dice < gate:
                shown = "none" if dice is None else f"{dice:.3f}"
                self.propagation_note = f"waiting: {what} {shown} < gate {gate:g}"
                return False
            self.propagation_note = f"started: {what} {dice:.3f} >= gate {gate:g}"
        self.propagation_start = self.epoch
        log.info("epoch %d: propagation %s", self.epoch, self.propagation_note)
        return True

    def propagation(self) -> None:
        cfg, ctx = self.config.propagation, self.ctx
        teacher = self.teacher
        round_index = propagation_round(self.epoch, cfg, self.propagation_start)
        if self.strategy.pseudo_cls_strong:
            assert self.strong_train is not None
            if cfg.method == "graph":
                targets, weights = propagate_labels_graph(
                    teacher,
                    self.weak_train,
                    self.strong_train,
                    cfg,
                    ctx=ctx,
                    round_index=round_index,
                )
            else:
                targets, weights = propagate_labels(
                    teacher,
                    self.strong_train,
                    cfg,
                    ctx=ctx,
                    domain=STRONG,
                    round_index=round_index,
                    prevalence=float(np.mean(self.weak_train.labels)),
                )
            if self._one_class(targets, weights) and cfg.skip_one_class:
                weights = np.zeros_like(weights)
            self.pseudo.strong_targets, self.pseudo.strong_weights = targets, weights
        if self.strategy.pseudo_roi_weak:
            self.pseudo.weak_masks, self.pseudo.weak_mask_weights = propagate_mask_targets(
                teacher, self.weak_train, cfg, ctx=ctx, domain=WEAK
            )
            if not self.pseudo.weak_masks.any():
                note = (
                    f"every pseudo ROI mask is empty (no voxel above ζ = {cfg.roi_threshold:g}): "
                    "the pseudo ROI loss teaches 'no node' everywhere"
                )
                log.warning("epoch %d propagation: %s", self.epoch, note)
                self.propagation_note = "; ".join(filter(None, [self.propagation_note, note]))
        self.pseudo.epoch = self.epoch
        log.info("epoch %d propagation: %s", self.epoch, self.pseudo.summary())

    def _one_class(self, targets: np.ndarray, weights: np.ndarray) -> bool:
        """Whether every kept pseudo class label ``(N_strong,)`` falls on one side of 0.5
        (typically a classifier still at chance on the other hospital); if so, warn in
        ``train.log`` and ``propagation_note``, saying whether the round's pseudo class
        loss is skipped (``propagation.skip_one_class``) or teaches that one class."""
        kept = targets[weights > 0]
        if kept.size < 2 or 0 < int((kept > 0.5).sum()) < kept.size:
            return False
        side = "positive" if bool(kept[0] > 0.5) else "negative"
        what = (
            "this round's pseudo class loss is skipped (propagation.skip_one_class)"
            if self.config.propagation.skip_one_class
            else "the pseudo class loss teaches one class"
        )
        note = f"every pseudo class label is {side} ({kept.size} strong scans): {what}"
        log.warning("epoch %d propagation: %s", self.epoch, note)
        self.propagation_note = "; ".join(filter(None, [self.propagation_note, note]))
        return True

    def _augmented(
        self, key: tuple[int, ...], volumes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """One scan's volumes (``image`` and any on its grid), augmented with the draw of
        ``key``: MONAI transforms (``training.augmentation``), else a left-right flip with
        probability 1/2 (``training.flip_augment``), else as they are."""
        if self.augmenter is not None:
            return self.augmenter(key, volumes)
        if self.config.training.flip_augment and np.random.default_rng(list(key)).random() < 0.5:
            return {k: v[..., ::-1] for k, v in volumes.items()}
        return volumes

    def _foreground_voxels(self, i: int) -> np.ndarray:
        """``(K, 3)`` node voxels of strong training scan ``i`` (computed once)."""
        if i not in self._foreground:
            assert self.strong_train is not None
            self._foreground[i] = np.argwhere(self.strong_train.mask(i) > 0)
        return self._foreground[i]

    def _load(
        self, volumes: VolumeSet, batch: list[int], step: int, stream: int, kind: str
    ) -> dict[str, Any]:
        """This rank's block of the global ``batch`` (positions in ``volumes``), augmented:
        ``image`` ``(b, 1, D, H, W)`` and, by ``kind``, ``labels`` (weak), ``pseudo_mask``
        and ``pseudo_weight`` (weak, once propagated), ``mask`` (strong whole scans with
        real masks) or ROI patches as ``image`` with their ``mask`` (``patch``). Each scan's draw
        depends on (seed, epoch, step, stream, its place in the global batch) only."""
        mine = self.ctx.shard(range(len(batch)))
        pseudo = self.pseudo
        items = []
        for k in mine:
            i = batch[k]
            key = (self.config.seed, self.epoch, step, stream, k)
            vols = {"image": volumes.image(i)}
            if kind == "weak" and self.strategy.pseudo_roi_weak and pseudo.weak_masks is not None:
                vols["pseudo_mask"] = pseudo.weak_masks[i]
                if pseudo.weak_mask_weights is not None:
                    vols["pseudo_weight"] = pseudo.weak_mask_weights[i]
            if volumes.load_masks and (kind == "patch" or (kind == "strong" and not self.patch)):
                vols["mask"] = volumes.mask(i)
            if kind == "patch":
                assert self.patch is not None
                rng = np.random.default_rng([*key, 1])
                corner = patch_corner(
                    vols["mask"],
                    self.patch,
                    self.config.training.roi_foreground,
                    rng,
                    self._foreground_voxels(i),
                )
                vols = {n: crop(v, corner, self.patch) for n, v in vols.items()}
            items.append(self._augmented(key, vols))
        out: dict[str, Any] = {
            n: torch.from_numpy(np.stack([it[n] for it in items])[:, None].copy()) for n in items[0]
        }
        index = [batch[k] for k in mine]
        out["index"] = index
        out["patient_ids"] = [volumes.records[i].patient_id for i in index]
        labels = volumes.labels
        if kind == "weak" and labels is not None:
            out["labels"] = torch.from_numpy(labels[index])
        return out

    def _losses(
        self,
        step: int,
        weak: dict[str, Any] | None,
        strong: dict[str, Any] | None,
        patches: dict[str, Any] | None,
        sizes: tuple[int, int, int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass of this rank's blocks (weak and strong whole scans, strong ROI
        patches) and the loss terms of the global batch (``sizes``: its weak, strong and
        patch counts); returns ``(weighted total, terms)``."""
        ctx, device, tcfg = self.ctx, self.ctx.device, self.config.training
        n_weak, n_strong, n_patch = sizes
        nw = 0 if weak is None else len(weak["index"])
        parts = [b["image"] for b in (weak, strong) if b is not None]
        pseudo_roi = weak is not None and "pseudo_mask" in weak
        strong_masks = strong is not None and "mask" in strong
        # decode only the scans with an ROI target (pseudo masks: weak; real masks: strong)
        roi: bool | slice = False
        if pseudo_roi and strong_masks:
            roi = True
        elif pseudo_roi:
            roi = slice(0, nw)
        elif strong_masks:
            roi = slice(nw, None)
        images = torch.cat(parts).to(device) if parts else None
        with contextlib.ExitStack() as routing:
            if self.domain_bn:  # weak scans in domain 0, strong in 1; the decoder sees roi
                n = 0 if images is None else len(images)
                ids = torch.tensor([WEAK] * nw + [STRONG] * (n - nw))
                routing.enter_context(domains(self.model, ids))
                # the decoder sees the sliced batch, unless the attention reads all of it
                if isinstance(roi, slice) and not self.model.classifier.attention:
                    routing.enter_context(domains(self.model.decoder, ids[roi]))
            with autocast(tcfg, device):
                out = self.train_model(
                    None if images is None else prepare_input(images, tcfg),
                    roi,
                    None if patches is None else prepare_input(patches["image"].to(device), tcfg),
                )
        terms: dict[str, torch.Tensor] = {}
        if weak is not None:
            terms["cls"] = batch_classification_loss(
                ctx, out["cls"][:nw], weak["labels"].to(device), total_weight=n_weak
            )
        # with model.malignancy_map the masks teach both maps: one loss over both, as one
        # batch of twice the items (maps_and_targets)
        if patches is not None:
            logits, masks, m = maps_and_targets(
                out, "_patch", slice(None), patches["mask"].to(device)
            )
            terms["roi"] = batch_roi_loss(
                ctx, self.roi_loss, logits, masks, total_items=m * n_patch
            )
        elif strong_masks:
            assert strong is not None
            logits, masks, m = maps_and_targets(
                out, "", slice(nw, None) if roi is True else slice(None), strong["mask"].to(device)
            )
            terms["roi"] = batch_roi_loss(
                ctx, self.roi_loss, logits, masks, total_items=m * n_strong
            )
        pseudo = self.pseudo
        if (
            strong is not None
            and self.strategy.pseudo_cls_strong
            and pseudo.strong_targets is not None
            and pseudo.strong_weights is not None
        ):
            index = strong["index"]
            t = torch.from_numpy(pseudo.strong_targets[index]).to(device)
            w = torch.from_numpy(pseudo.strong_weights[index]).to(device)
            weight_sum = float(pseudo.strong_weights[strong["global"]].sum())
            # graph weights (certainty x class weight) scale each scan's loss, averaged
            # over the batch (Iscen et al.); the paper's 0/1 weights select scans
            graph = self.config.propagation.method == "graph"
            if weight_sum > 0:
                terms["pseudo_cls"] = batch_classification_loss(
                    ctx,
                    out["cls"][nw:],
                    t,
                    w,
                    total_weight=float(n_strong) if graph else weight_sum,
                    scale_items=graph,
                )
        if pseudo_roi:
            assert weak is not None
            weak_roi, target, m = maps_and_targets(
                out, "", slice(0, nw), weak["pseudo_mask"].to(device)
            )
            if "pseudo_weight" not in weak:
                terms["pseudo_roi"] = batch_roi_loss(
                    ctx, self.roi_loss, weak_roi, target, total_items=m * n_weak
                )
            else:
                weight = weak["pseudo_weight"].to(device)
                terms["pseudo_roi"] = batch_masked_roi_loss(
                    ctx, weak_roi, target, torch.cat([weight] * m)
                )
        for k, v in terms.items():
            if not torch.isfinite(v):  # a global value: every rank stops here together
                who = [
                    f"{name} patients {b['patient_ids']}"
                    for name, b in (("weak", weak), ("strong", strong), ("ROI patch", patches))
                    if b
                ]
                raise TrainingError(
                    f"loss term {k!r} became {float(v.detach())} at epoch {self.epoch} step {step} "
                    f"({', '.join(who)}); stopped, the last good checkpoint is "
                    f"{self.run_dir / 'checkpoints'}"
                )
        weights = tcfg.loss
        total = sum(getattr(weights, k) * v for k, v in terms.items())
        assert isinstance(total, torch.Tensor)
        return total, terms

    def train_step(
        self,
        step: int,
        weak_batch: list[int] | None,
        strong_batch: list[int] | None,
        patch_batch: list[int] | None = None,
    ) -> dict[str, float]:
        """One optimiser step on a global batch: positions in the weak training set (None
        in the ROI warm-up), in the strong one as whole scans (ROI masks without patches,
        pseudo class labels) and as ROI patches. This rank trains on its block of each.
        Returns the global batch's losses."""
        weak = (
            None if weak_batch is None else self._load(self.weak_train, weak_batch, step, 0, "weak")
        )
        strong = patches = None
        if strong_batch is not None:
            assert self.strong_train is not None
            strong = self._load(self.strong_train, strong_batch, step, 1, "strong")
            strong["global"] = strong_batch
        if patch_batch is not None:
            assert self.strong_train is not None
            patches = self._load(self.strong_train, patch_batch, step, 2, "patch")
        sizes = (
            len(weak_batch or []),
            len(strong_batch or []),
            len(patch_batch or []),
        )
        # the backward pass stays inside the routing: checkpointing re-runs the forward
        total, terms = self._losses(step, weak, strong, patches, sizes)
        self.optimizer.zero_grad(set_to_none=True)
        optimizer_step(total, self.optimizer, self.scaler)  # scaler: fp16 AMP
        self.steps_done += 1
        if self.ema is not None:
            self.ema.update(self.model, self.ema.updates)
        losses = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        return {"loss": float(total.detach()), **losses}

    def epoch_batches(self) -> list[tuple[list[int] | None, list[int] | None, list[int] | None]]:
        """This epoch's global batches ``(weak, strong whole scans, strong patches)``.

        ``training.steps_per_epoch`` steps, each set drawn from its own seeded stream
        (``sampling.stream_batches``); unset, one pass over the weak training split (the
        paper; a last batch of 1 is merged, it would break batch norm). The ROI warm-up
        draws no weak scans."""
        tcfg, seed, epoch = self.config.training, self.config.seed, self.epoch
        warmup = self.epoch < self.roi_warmup
        if tcfg.steps_per_epoch is not None:
            steps = tcfg.steps_per_epoch
            weak = stream_batches(len(self.weak_train), tcfg.batch_size, steps, seed, epoch, 0)
        else:
            weak = epoch_order(len(self.weak_train), tcfg.batch_size, seed, epoch, 0)
            # a batch of 1 breaks batch norm, and every rank needs a scan of every batch
            if len(weak) > 1 and len(weak[-1]) < max(2, self.ctx.world_size):
                weak[-2] += weak.pop()
            steps = len(weak)
        none: list[list[int] | None] = [None] * steps
        strong, patches = list(none), list(none)
        if self.strong_train is not None:
            n = len(self.strong_train)
            pseudo_cls = self.strategy.pseudo_cls_strong and self.pseudo.strong_targets is not None
            roi_whole = self.strategy.roi_strong and self.patch is None
            if pseudo_cls or roi_whole:
                size = tcfg.strong_batch_size
                if self.patch is not None and tcfg.pseudo_cls_batch_size is not None:
                    size = tcfg.pseudo_cls_batch_size
                strong = list(stream_batches(n, size, steps, seed, epoch, 1))
            if self.strategy.roi_strong and self.patch is not None:
                patches = list(stream_batches(n, tcfg.strong_batch_size, steps, seed, epoch, 2))
        if warmup:  # the decoder alone, on the strong set's masks
            return [
                (None, s if self.patch is None else None, p)
                for s, p in zip(strong, patches, strict=True)
            ]
        return list(zip(weak, strong, patches, strict=True))

    def train_epoch(self) -> dict[str, float]:
        self.train_model.train()
        batches = self.epoch_batches()
        sums: dict[str, float] = {}
        for step, (wb, sb, pb) in enumerate(batches):
            for k, v in self.train_step(step, wb, sb, pb).items():
                sums[k] = sums.get(k, 0.0) + v
        self.ctx.average_buffers(self.model)  # batch-norm running statistics
        if self.ema is not None:
            self.ctx.average_buffers(self.ema.module)
        row = {k: v / len(batches) for k, v in sums.items()}
        row["phase"] = "roi-warmup" if self.epoch < self.roi_warmup else "joint"
        return row

    def score(self, model: MultiTaskNet) -> tuple[dict[str, float], np.ndarray]:
        """``model``'s validation row (AUC, BCE, strong-set Dice) and its probabilities
        ``(N_val,)`` for the weak set's validation split."""
        probs = predict_probabilities(model, self.weak_val, ctx=self.ctx, domain=WEAK)
        labels = self.weak_val.labels
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        row = {
            "val_auc": compute_auc(labels, probs),
            "val_loss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),
        }
        if self.strong_val is not None and len(self.strong_val):
            row["strong_val_dice"] = _strong_dice(
                model, self.strong_val, self.config.propagation.roi_threshold, self.ctx
            )
        return row, probs

    def validate(self) -> dict[str, float]:
        """Score the model that selection chooses among (the EMA under ``ema``)."""
        row, probs = self.score(self.selected_model)
        labels = self.weak_val.labels
        assert labels is not None
        self.val_predictions += [
            {"epoch": self.epoch, "patient_id": pid, "label": int(y), "probability": f"{p:.8f}"}
            for pid, y, p in zip(self.weak_val.patient_ids, labels, probs, strict=True)
        ]
        return row

    def _average_epoch(self) -> None:
        """Add this epoch's weights to the SWA average when the epoch is in its window."""
        tcfg = self.config.training
        first = selection.swa_first_epoch(tcfg.epochs, tcfg.swa_epochs)
        if tcfg.selection != "swa" or self.epoch < first:
            return
        if self.swa is None or self.epoch == first:
            self.swa = SwaAverager(self.model)
            self.swa_first = self.epoch
        elif self.swa_first != first:
            log.warning(
                "the SWA window moved (training.epochs changed): averaging epochs %d..%d",
                self.swa_first,
                self.epoch,
            )
        self.swa.add(self.model)

    def _select(self, row: dict[str, Any]) -> MultiTaskNet | None:
        """Update ``best`` after this epoch; returns the model ``best.pt`` then holds, or
        None when it does not change (see ``selection``)."""
        tcfg = self.config.training
        final = self.epoch == tcfg.epochs - 1
        if tcfg.selection in ("best_val", "ema"):
            if self.epoch < self.roi_warmup:  # the classifier has not trained yet
                return None
            better = row["val_auc"] > self.best["val_auc"] or (
                row["val_auc"] == self.best["val_auc"] and row["val_loss"] < self.best["val_loss"]
            )
            if not better:
                return None
            chosen = self.selected_model
        elif not final:
            return None
        elif tcfg.selection in ("last", "ema_last"):
            chosen = self.selected_model
        else:  # swa: the average, with batch-norm statistics of its own weights
            assert self.swa is not None
            chosen = self.swa.module  # type: ignore[assignment]
            sets = [(self.weak_train, WEAK)]
            if self.domain_bn and self.strong_train is not None:
                sets.append((self.strong_train, STRONG))
            update_bn(chosen, selection.bn_batches(sets, tcfg.batch_size))
            scored, _ = self.score(chosen)
            log.info("SWA of epochs %d..%d: validation %s", self.swa_first, self.epoch, scored)
            row = {**row, **scored}
        self.best = {"val_auc": row["val_auc"], "val_loss": row["val_loss"], "epoch": row["epoch"]}
        if tcfg.selection == "swa":
            self.best["swa_first_epoch"] = self.swa_first
        return chosen

    def _checkpoint_of(self, model: MultiTaskNet, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` with ``model``'s weights (what evaluate and predict load)."""
        return {**state, "model": model.state_dict()} if model is not self.model else state

    def epoch_end(self, row: dict[str, Any], writer: Any) -> None:
        if self.ctx.is_distributed:
            self.ctx.check_identical(self.model, f"after epoch {self.epoch}")
            if self.ema is not None:
                self.ctx.check_identical(self.ema.module, f"(EMA teacher) after epoch {self.epoch}")
        self.history.append(row)
        self._average_epoch()
        chosen = self._select(row)  # collectives inside (SWA validation): every rank
        validated = self.selected_model
        self.epoch += 1
        if not self.ctx.is_main:
            return
        _write_history(self.run_dir / "history.csv", self.history)
        selection.write_val_predictions(
            self.run_dir / selection.VAL_PREDICTIONS, self.val_predictions
        )
        for k, v in row.items():
            if isinstance(v, float) and k != "epoch":
                writer.add_scalar(k, v, row["epoch"])
        state = self.state()
        if chosen is not None:
            _save_checkpoint(
                _checkpoint_path(self.run_dir, "best"), self._checkpoint_of(chosen, state)
            )
        if self.config.training.keep_epochs:  # the validated weights of this epoch
            kept = {
                k: v for k, v in state.items() if k not in ("optimizer", "ema", "swa", "pseudo")
            }
            kept.update(
                best={
                    "val_auc": row["val_auc"],
                    "val_loss": row["val_loss"],
                    "epoch": row["epoch"],
                },
                selection="epoch",
            )
            name = f"epoch_{row['epoch']:03d}"
            _save_checkpoint(
                _checkpoint_path(self.run_dir, name), self._checkpoint_of(validated, kept)
            )
        _save_checkpoint(_checkpoint_path(self.run_dir, "last"), state)

    def run(self, progress: bool = True) -> dict[str, Any]:
        writer = None
        if self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.epoch)
        epochs = self.config.training.epochs
        bar = tqdm(
            range(self.epoch, epochs),
            initial=self.epoch,
            total=epochs,
            desc=self.config.strategy,
            disable=None if progress and self.ctx.is_main else True,
            leave=False,
        )
        try:
            for _ in bar:
                start = time.perf_counter()
                torch.manual_seed(self.config.seed * 100_003 + self.epoch)  # dropout etc.
                propagated = self.propagation_due()
                if propagated:
                    self.propagation()
                row: dict[str, Any] = {"epoch": self.epoch, **self.train_epoch(), **self.validate()}
                row.update(
                    propagated=int(propagated),
                    lr=self.optimizer.param_groups[0]["lr"],
                    seconds=round(time.perf_counter() - start, 3),
                    step=self.steps_done,
                )
                if propagated:
                    row.update(self.pseudo.summary())
                if self.propagation_note:
                    row["propagation_note"] = self.propagation_note
                log.info(
                    "epoch %d %s",
                    self.epoch,
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                )
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
                self.epoch_end(row, writer)
            status = roi_decoder_status(self.history)
            if status is not None and status["note"]:
                log.warning("%s", status["note"])
            if self.ctx.is_distributed:
                checksum = self.ctx.check_identical(self.model, "at the end of training")
                log.info(
                    "weights identical on %d ranks (sha256 %s)", self.ctx.world_size, checksum[:16]
                )
        finally:
            if writer is not None:
                writer.close()
        return {"best": self.best, "epochs": self.epoch}


def resolve_manifests(config: Config, weak_csv: Path | None, strong_csv: Path | None) -> Config:
    """``config`` with the manifests' absolute paths, as a run's ``config.yaml`` holds it."""
    data = config.model_dump(mode="json")
    if weak_csv is not None:
        data["manifests"]["weak"] = str(Path(weak_csv).resolve())
    if strong_csv is not None:
        data["manifests"]["strong"] = str(Path(strong_csv).resolve())
    return validate(data)


def _open_run_dir(config: Config, run_dir: Path, resume: bool) -> None:
    """Check that ``run_dir`` may take this run (or resume it); write ``config.yaml``."""
    config_path = run_dir / "config.yaml"
    if resume:
        if not config_path.exists():
            raise LymphdxError(f"cannot resume: {run_dir} holds no run (no config.yaml)")
        saved = validate(yaml.safe_load(config_path.read_text()), str(config_path))
        differ = config_differences(saved, config)
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


def _warm_cache(config: Config, strategy: Strategy, ctx: DistContext) -> None:
    """Preprocess the run's images, each rank its block, before rank 0 alone reads them
    all for the splits and normalisation statistics."""
    assert config.manifests.weak and config.manifests.strong

    def warm() -> None:
        weak, strong = load_manifests(config.manifests.weak, config.manifests.strong)
        images = [(r.image, r.patient_id) for r in weak]
        if strategy.uses_strong:
            images += [(r.image, r.patient_id) for r in strong]
        cache = PreprocessCache(cache_dir_of(config), config.data)
        for image, patient in ctx.shard(images):
            cache.image(image, patient)

    ctx.on_every_rank(warm)


def _shared_run_data(
    config: Config, run_dir: Path, strategy: Strategy, ctx: DistContext
) -> RunData:
    """``load_run_data`` on rank 0 (it writes ``splits.csv`` and ``normalization.json``);
    the other ranks get its records and normalisers, not the files, so the run folder
    need not be on a file system they share."""
    if ctx.is_distributed:
        _warm_cache(config, strategy, ctx)
    data = ctx.on_main(lambda: load_run_data(config, run_dir, need_strong=strategy.uses_strong))
    if not ctx.is_distributed:
        assert data is not None
        return data
    weak, strong, normalizers = ctx.broadcast_object(
        (data.weak, data.strong, data.normalizers) if data is not None else None
    )
    if data is not None:
        return data
    return RunData(weak, strong, PreprocessCache(cache_dir_of(config), config.data), normalizers)


def _log_node_sizes(data: RunData, config: Config) -> dict[str, Any] | None:
    """How large the strong training set's nodes are on the grid, in ``train.log``; a
    warning when they are small for it. Returns ``node_size_status``'s dict."""
    strong = data.volumes("strong", "train", masks=True)
    spacing = config.data.spacing if config.data.fit == "crop" else None
    status = node_size_status((strong.mask(i) for i in range(len(strong))), spacing)
    if status is None:
        return None
    log.info(
        "strong training set: %d nodes, median equivalent diameter %.1f voxels%s",
        status["n_nodes"],
        status["median_diameter_voxels"],
        "" if spacing is None else f" ({status['median_diameter_mm']:.1f} mm)",
    )
    if status["note"]:
        log.warning("%s", status["note"])
    return status


def _budget_for_nodes(
    config: Config, nodes: dict[str, Any] | None, run_dir: Path, ctx: DistContext
) -> Config:
    """``config`` with ``training.epochs`` raised to ``training.small_node_epochs`` when the
    strong set's nodes are small for the grid (``nodes["note"]``), rewritten into the run's
    ``config.yaml`` (``config_differences`` ignores the epochs, so ``--resume`` and
    ``compare`` accept it); else ``config`` as it is."""
    wanted = config.training.small_node_epochs
    if nodes is None or not nodes["note"] or wanted is None or wanted <= config.training.epochs:
        return config
    data = config.model_dump(mode="json")
    data["training"]["epochs"] = wanted
    budgeted = validate(data)
    log.warning(
        "training %d epochs instead of %d: the nodes are small for the grid "
        "(training.small_node_epochs)",
        wanted,
        config.training.epochs,
    )
    ctx.on_main(lambda: write_text(run_dir / "config.yaml", dump_config(budgeted)))
    return budgeted


def _remove_new_run(run_dir: Path, created: bool) -> None:
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


def train(
    config: Config,
    run_dir: str | Path,
    weak_csv: str | Path | None = None,
    strong_csv: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one run into ``run_dir``; returns ``{"best": {...}, "epochs": n}``.

    ``run_dir`` gets ``config.yaml`` (fully resolved), ``splits.csv``,
    ``normalization.json``, ``history.csv``, ``checkpoints/{last,best}.pt``,
    ``tensorboard/`` and ``train.log``. Under ``torchrun`` (``WORLD_SIZE`` > 1) every
    rank calls this; rank 0's config rules and rank 0 alone writes ``run_dir``.
    """
    run_dir = Path(run_dir)
    config = resolve_manifests(config, weak_csv and Path(weak_csv), strong_csv and Path(strong_csv))
    lock = contextlib.ExitStack()

    def open_run_dir() -> None:
        if resume and not (run_dir / "config.yaml").exists():  # before making any folder
            what = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
            raise LymphdxError(f"cannot resume: the run folder {run_dir} {what}")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            reason = folder_problem(run_dir) or err.strerror
            raise LymphdxError(f"cannot write to the run folder {run_dir}: {reason}") from None
        lock.enter_context(run_lock(run_dir))  # one writer per run folder
        _open_run_dir(config, run_dir, resume)
        if resume:  # what a killed predecessor was writing when it died
            stale.extend(remove_stale_temporaries(run_dir))

    created = not run_dir.exists()
    stale: list[Path] = []
    with distributed(config.training.device) as ctx, lock:
        config = ctx.broadcast_object(config)
        try:
            ctx.on_main(open_run_dir)
        except BaseException:
            if ctx.is_main and created:  # e.g. --resume of nothing: not even an empty folder
                (run_dir / ".lock").unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
        handler = _setup_logging(run_dir) if ctx.is_main else None
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
            data = _shared_run_data(config, run_dir, strategy, ctx)
            if strategy.trains_decoder:
                nodes = ctx.broadcast_object(ctx.on_main(lambda: _log_node_sizes(data, config)))
                config = _budget_for_nodes(config, nodes, run_dir, ctx)
            trainer = _Trainer(config, run_dir, data, ctx)
            last = _checkpoint_path(run_dir, "last")
            state = ctx.on_main(lambda: load_checkpoint(last) if resume and last.exists() else None)
            state = ctx.broadcast_object(state)
            if state is not None:
                trainer.restore(state)
                log.info("resumed %s at epoch %d", run_dir, trainer.epoch)
        except BaseException:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
                handler = None
            if ctx.is_main and not resume:  # refused before training: leave nothing behind
                _remove_new_run(run_dir, created)
            raise
        try:
            return trainer.run(progress=progress)
        except BaseException:
            # refused in the first epoch (e.g. a scan read only then): as above, unless an
            # epoch ended (its checkpoint makes the run resumable)
            if not resume and not _checkpoint_path(run_dir, "last").exists():
                if handler is not None:
                    log.removeHandler(handler)
                    handler.close()
                    handler = None
                if ctx.is_main:
                    _remove_new_run(run_dir, created)
            raise
        finally:
            # the DDP wrapper holds the process group: let it go before the group does
            del trainer
            if handler is not None:
                log.removeHandler(handler)
                handler.close()
