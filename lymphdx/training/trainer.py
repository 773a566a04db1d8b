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
"""

from __future__ import annotations

import csv
import io as _io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

import lymphdx
from lymphdx.config import Config, dump_config, validate
from lymphdx.data.datasets import VolumeSet, epoch_order
from lymphdx.data.manifest import StrongRecord, WeakRecord, load_manifests, resolve_splits
from lymphdx.data.preprocess import (
    Normalizer,
    PreprocessCache,
    fit_normalizers,
    load_normalizers,
    save_normalizers,
)
from lymphdx.errors import LymphdxError
from lymphdx.evaluation.metrics import auc as compute_auc
from lymphdx.fileutil import atomic_path, write_text
from lymphdx.models.multitask import MultiTaskNet, build_model
from lymphdx.training.losses import RoiLoss, classification_loss
from lymphdx.training.propagation import (
    PseudoLabels,
    is_propagation_epoch,
    predict_probabilities,
    propagate_labels,
    propagate_masks,
)
from lymphdx.training.strategies import Strategy, get_strategy

__all__ = [
    "config_differences",
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
    "pseudo_mask_voxel_fraction",
    "lr",
    "seconds",
]


class TrainingError(LymphdxError):
    """Training cannot go on (e.g. a loss became NaN); the last good checkpoint is kept."""


def config_differences(saved: Config, new: Config) -> list[str]:
    """Keys whose values differ between two configs, ignoring ``training.epochs`` (a run may
    be extended) and ``data.cache_dir`` (where the cache lives changes no result)."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved.model_dump(mode="json")), flat(new.model_dump(mode="json"))
    ignore = {"training.epochs", "data.cache_dir"}
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if k not in ignore and a.get(k) != b.get(k)
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


def load_run_data(config: Config, run_dir: Path, need_strong: bool = True) -> RunData:
    """Manifests, splits (``splits.csv``), cache and normalisers (``normalization.json``)."""
    if not config.manifests.weak or not config.manifests.strong:
        raise LymphdxError("the config names no manifests (manifests.weak / manifests.strong)")
    weak, strong = load_manifests(config.manifests.weak, config.manifests.strong)
    weak, strong = resolve_splits(
        weak,
        strong,
        run_dir,
        config.data.split.weak,
        config.data.split.strong,
        config.data.split_seed,
    )
    for split in ("train", "val"):
        labels = {r.label for r in weak if r.split == split}
        if labels != {0, 1}:
            raise LymphdxError(
                f"the weak set's {split} split of {config.manifests.weak} holds "
                f"{'no patients' if not labels else 'only label ' + str(labels.pop())}: "
                "AUC-based model selection needs both classes; give a split column with "
                "positives and negatives in every split, or more patients"
            )
    cache = PreprocessCache(cache_dir_of(config), config.data)
    norm_path = run_dir / "normalization.json"
    if norm_path.exists():
        normalizers = load_normalizers(norm_path)
    else:
        domains = {"weak": [r.image for r in weak if r.split == "train"]}
        domains["strong"] = [r.image for r in strong if r.split == "train"] if need_strong else []
        if not domains["strong"]:
            domains.pop("strong")
        normalizers = fit_normalizers(cache, domains)
        if "strong" not in normalizers:  # never used; recorded so the file is complete
            normalizers["strong"] = normalizers["weak"]
        save_normalizers(norm_path, normalizers)
    return RunData(weak, strong, cache, normalizers)


def _checkpoint_path(run_dir: Path, name: str) -> Path:
    return run_dir / "checkpoints" / f"{name}.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain data only: ``weights_only=True``)."""
    if not path.exists():
        raise LymphdxError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors of many kinds
        raise LymphdxError(f"cannot load checkpoint {path}: {err}") from None


def _pseudo_to_state(p: PseudoLabels) -> dict[str, Any]:
    def t(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a))

    return {
        "epoch": p.epoch,
        "strong_targets": t(p.strong_targets),
        "strong_weights": t(p.strong_weights),
        "weak_masks": t(p.weak_masks),
    }


def _pseudo_from_state(d: dict[str, Any]) -> PseudoLabels:
    def a(x: torch.Tensor | None) -> np.ndarray | None:
        return None if x is None else x.numpy()

    return PseudoLabels(
        a(d["strong_targets"]), a(d["strong_weights"]), a(d["weak_masks"]), d["epoch"]
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


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def _strong_dice(model: MultiTaskNet, volumes: VolumeSet, threshold: float) -> float:
    model.eval()
    inter = total = 0.0
    for start in range(0, len(volumes), 4):
        batch = volumes.batch(range(start, min(start + 4, len(volumes))))
        pred = torch.sigmoid(model(batch.images)["roi"]) > threshold
        target = batch.masks > 0
        inter += float((pred & target).sum())
        total += float(pred.sum() + target.sum())
    model.train()
    return 1.0 if total == 0 else 2 * inter / total


class _Trainer:
    """State of one training run; ``run()`` is the loop of the module docstring."""

    def __init__(self, config: Config, run_dir: Path, data: RunData) -> None:
        self.config = config
        self.run_dir = run_dir
        self.data = data
        self.strategy: Strategy = get_strategy(config.strategy)
        torch.manual_seed(config.seed)
        self.model = build_model(config.model)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=config.training.lr,
            weight_decay=config.training.weight_decay,
        )
        self.roi_loss = RoiLoss()
        self.weak_train = data.volumes("weak", "train")
        self.weak_val = data.volumes("weak", "val")
        self.strong_train = (
            data.volumes("strong", "train", masks=self.strategy.roi_strong)
            if self.strategy.uses_strong
            else None
        )
        self.strong_val = (
            data.volumes("strong", "val", masks=True) if self.strategy.roi_strong else None
        )
        self.pseudo = PseudoLabels()
        self.epoch = 0
        self.best: dict[str, float] = {"val_auc": -1.0, "val_loss": math.inf, "epoch": -1}
        self.history: list[dict[str, Any]] = []

    # -- checkpoints -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best": dict(self.best),
            "pseudo": _pseudo_to_state(self.pseudo),
            "config_yaml": dump_config(self.config),
            "lymphdx_version": lymphdx.__version__,
        }

    def restore(self, state: dict[str, Any]) -> None:
        saved = validate(yaml.safe_load(state.get("config_yaml", "")), "checkpoint config")
        differ = config_differences(saved, self.config)
        if differ:
            raise LymphdxError(
                f"cannot resume {self.run_dir}: its checkpoint was written with another "
                f"config ({'; '.join(differ)})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best = dict(state["best"])
        self.pseudo = _pseudo_from_state(state["pseudo"])
        self.history = [
            r for r in _read_history(self.run_dir / "history.csv") if int(r["epoch"]) < self.epoch
        ]

    # -- the named steps ---------------------------------------------------------------
    def propagation(self) -> None:
        cfg = self.config.propagation
        if self.strategy.pseudo_cls_strong:
            targets, weights = propagate_labels(self.model, self.strong_train, cfg)
            self.pseudo.strong_targets, self.pseudo.strong_weights = targets, weights
        if self.strategy.pseudo_roi_weak:
            self.pseudo.weak_masks = propagate_masks(self.model, self.weak_train, cfg)
        self.pseudo.epoch = self.epoch
        log.info("epoch %d propagation: %s", self.epoch, self.pseudo.summary())

    def _strong_batches(self, n_batches: int) -> list[list[int]]:
        size, seed, n = (
            self.config.training.strong_batch_size,
            self.config.seed,
            len(self.strong_train),
        )
        out: list[list[int]] = []
        stream = 1
        while len(out) < n_batches:
            out += [
                b
                for b in epoch_order(n, size, seed, self.epoch, stream)
                if len(b) == size or n < size
            ]
            stream += 1
        return out[:n_batches]

    def train_step(
        self, step: int, weak_index: list[int], strong_index: list[int] | None
    ) -> dict[str, float]:
        flip_rng = np.random.default_rng([self.config.seed, self.epoch, step, 7])
        flips = self.config.training.flip_augment
        wflip = (flip_rng.random(len(weak_index)) < 0.5).tolist() if flips else None
        weak = self.weak_train.batch(weak_index, wflip)
        images, nw = weak.images, len(weak_index)
        strong = None
        if strong_index is not None:
            sflip = (flip_rng.random(len(strong_index)) < 0.5).tolist() if flips else None
            strong = self.strong_train.batch(strong_index, sflip)
            images = torch.cat([images, strong.images])
        pseudo_roi = self.strategy.pseudo_roi_weak and self.pseudo.weak_masks is not None
        roi_strong = strong is not None and self.strategy.roi_strong
        # decode only the scans with an ROI target (real masks: strong; pseudo masks: weak)
        roi: bool | slice = False
        if pseudo_roi and roi_strong:
            roi = True
        elif pseudo_roi:
            roi = slice(0, nw)
        elif roi_strong:
            roi = slice(nw, None)
        out = self.model(images, roi=roi)
        weights = self.config.training.loss
        terms: dict[str, torch.Tensor] = {"cls": classification_loss(out["cls"][:nw], weak.labels)}
        if roi_strong:
            strong_roi = out["roi"][nw:] if roi is True else out["roi"]
            terms["roi"] = self.roi_loss(strong_roi, strong.masks)
        if (
            strong is not None
            and self.strategy.pseudo_cls_strong
            and self.pseudo.strong_targets is not None
        ):
            t = torch.from_numpy(self.pseudo.strong_targets[strong_index])
            w = torch.from_numpy(self.pseudo.strong_weights[strong_index])
            if float(w.sum()) > 0:
                terms["pseudo_cls"] = classification_loss(out["cls"][nw:], t, w)
        if pseudo_roi:
            masks = self.pseudo.weak_masks[weak_index]
            if wflip is not None:
                masks = np.stack(
                    [m[..., ::-1] if f else m for m, f in zip(masks, wflip, strict=True)]
                )
            target = torch.from_numpy(np.ascontiguousarray(masks))[:, None]
            terms["pseudo_roi"] = self.roi_loss(out["roi"][:nw], target)
        total = sum(getattr(weights, k) * v for k, v in terms.items())
        for k, v in terms.items():
            if not torch.isfinite(v):
                raise TrainingError(
                    f"loss term {k!r} became {float(v)} at epoch {self.epoch} step {step} "
                    f"(weak patients {weak.patient_ids}"
                    + (f", strong patients {strong.patient_ids}" if strong else "")
                    + f"); stopped, the last good checkpoint is {self.run_dir / 'checkpoints'}"
                )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        losses = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        return {"loss": float(total.detach()), **losses}

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        tcfg = self.config.training
        batches = epoch_order(
            len(self.weak_train), tcfg.batch_size, self.config.seed, self.epoch, 0
        )
        if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of 1 breaks batch norm
            batches[-2] += batches.pop()
        use_strong = self.strong_train is not None and (
            self.strategy.roi_strong or self.pseudo.strong_targets is not None
        )
        strong_batches = self._strong_batches(len(batches)) if use_strong else [None] * len(batches)
        sums: dict[str, float] = {}
        for step, (wb, sb) in enumerate(zip(batches, strong_batches, strict=True)):
            for k, v in self.train_step(step, wb, sb).items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / len(batches) for k, v in sums.items()}

    def validate(self) -> dict[str, float]:
        probs = predict_probabilities(self.model, self.weak_val)
        labels = self.weak_val.labels
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        row = {
            "val_auc": compute_auc(labels, probs),
            "val_loss": float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))),
        }
        if self.strong_val is not None and len(self.strong_val):
            row["strong_val_dice"] = _strong_dice(
                self.model, self.strong_val, self.config.propagation.roi_threshold
            )
        return row

    def epoch_end(self, row: dict[str, Any], writer: Any) -> None:
        self.history.append(row)
        _write_history(self.run_dir / "history.csv", self.history)
        for k, v in row.items():
            if isinstance(v, float) and k != "epoch":
                writer.add_scalar(k, v, row["epoch"])
        better = row["val_auc"] > self.best["val_auc"] or (
            row["val_auc"] == self.best["val_auc"] and row["val_loss"] < self.best["val_loss"]
        )
        self.epoch += 1
        if better:
            self.best = {
                "val_auc": row["val_auc"],
                "val_loss": row["val_loss"],
                "epoch": row["epoch"],
            }
        state = self.state()
        if better:
            _save_checkpoint(_checkpoint_path(self.run_dir, "best"), state)
        _save_checkpoint(_checkpoint_path(self.run_dir, "last"), state)

    def run(self, progress: bool = True) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.epoch)
        epochs = self.config.training.epochs
        bar = tqdm(
            range(self.epoch, epochs),
            initial=self.epoch,
            total=epochs,
            desc=self.config.strategy,
            disable=None if progress else True,
            leave=False,
        )
        try:
            for _ in bar:
                start = time.perf_counter()
                torch.manual_seed(self.config.seed * 100_003 + self.epoch)  # dropout etc.
                propagated = self.strategy.propagates and is_propagation_epoch(
                    self.epoch, self.config.propagation
                )
                if propagated:
                    self.propagation()
                row: dict[str, Any] = {"epoch": self.epoch, **self.train_epoch(), **self.validate()}
                row.update(
                    propagated=int(propagated),
                    lr=self.optimizer.param_groups[0]["lr"],
                    seconds=round(time.perf_counter() - start, 3),
                )
                if propagated:
                    row.update(self.pseudo.summary())
                log.info(
                    "epoch %d %s",
                    self.epoch,
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
                )
                bar.set_postfix(loss=f"{row['loss']:.3f}", val_auc=f"{row['val_auc']:.3f}")
                self.epoch_end(row, writer)
        finally:
            writer.close()
        return {"best": self.best, "epochs": self.epoch}


def _resolve_manifests(config: Config, weak_csv: Path | None, strong_csv: Path | None) -> Config:
    data = config.model_dump(mode="json")
    if weak_csv is not None:
        data["manifests"]["weak"] = str(Path(weak_csv).resolve())
    if strong_csv is not None:
        data["manifests"]["strong"] = str(Path(strong_csv).resolve())
    return validate(data)


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
    ``tensorboard/`` and ``train.log``.
    """
    run_dir = Path(run_dir)
    config = _resolve_manifests(
        config, weak_csv and Path(weak_csv), strong_csv and Path(strong_csv)
    )
    config_path = run_dir / "config.yaml"
    last = _checkpoint_path(run_dir, "last")
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
    handler = _setup_logging(run_dir)
    try:
        if config.training.num_threads:
            torch.set_num_threads(config.training.num_threads)
        strategy = get_strategy(config.strategy)
        data = load_run_data(config, run_dir, need_strong=strategy.uses_strong)
        trainer = _Trainer(config, run_dir, data)
        if resume and last.exists():
            trainer.restore(load_checkpoint(last))
            log.info("resumed %s at epoch %d", run_dir, trainer.epoch)
        return trainer.run(progress=progress)
    finally:
        log.removeHandler(handler)
        handler.close()
