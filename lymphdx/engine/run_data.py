"""What a run trains on: both manifests with their splits (``splits.csv``), the
preprocessing cache and the per-domain normalisers (``normalization.json``), checked
before the first epoch, shared with every rank under ``torchrun``; and the node-size
check that may lengthen a run (``training.small_node_epochs``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lymphdx.core.config import Config, dump_config, validate
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import path_problem, write_text
from lymphdx.core.strategies import Strategy, get_strategy
from lymphdx.data.datasets import VolumeSet
from lymphdx.data.manifest import (
    StrongRecord,
    WeakRecord,
    check_duplicate_scans,
    load_manifests,
)
from lymphdx.data.preprocess import (
    Normalizer,
    PreprocessCache,
    check_calibration,
    fit_normalizers,
    load_normalizers,
    save_normalizers,
)
from lymphdx.data.splits import resolve_splits
from lymphdx.engine.distributed import DistContext
from lymphdx.engine.roi_status import node_size_status

log = logging.getLogger("lymphdx")


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


def data_to_fit(
    config: Config, run_dir: Path, need_strong: bool, what: str, instead: str
) -> RunData:
    """``load_run_data`` for something fitted after training on the run's scans (``what``,
    e.g. "an ROI readout for its best weights"); when the scans cannot be read, an error
    that says where to fit it, or the setting that does without it (``instead``)."""
    try:
        return load_run_data(config, run_dir, need_strong=need_strong)
    except LymphdxError as err:
        raise LymphdxError(
            f"{run_dir} has no {what} yet, and fitting it needs the run's training scans, "
            f"which cannot be read: {err}. Run `lymphdx evaluate {run_dir}` where the data "
            f"is, or set {instead} in the run's config.yaml"
        ) from None


def resolve_manifests(config: Config, weak_csv: Path | None, strong_csv: Path | None) -> Config:
    """``config`` with the manifests' absolute paths, as a run's ``config.yaml`` holds it."""
    data = config.model_dump(mode="json")
    for key, csv_path in (("weak", weak_csv), ("strong", strong_csv)):
        if csv_path is None:
            continue
        # checked before resolve(), which raises on a loop of links (Python < 3.13)
        problem = path_problem(csv_path)
        if problem is not None:
            raise InputError(f"{key} manifest {problem}", csv_path)
        data["manifests"][key] = str(Path(csv_path).resolve())
    return validate(data)


def warm_cache(config: Config, strategy: Strategy, ctx: DistContext) -> None:
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


def shared_run_data(config: Config, run_dir: Path, strategy: Strategy, ctx: DistContext) -> RunData:
    """``load_run_data`` on rank 0 (it writes ``splits.csv`` and ``normalization.json``);
    the other ranks get its records and normalisers, not the files, so the run folder
    need not be on a file system they share."""
    if ctx.is_distributed:
        warm_cache(config, strategy, ctx)
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


def log_node_sizes(data: RunData, config: Config) -> dict[str, Any] | None:
    """How large the strong training set's nodes are on the grid, in ``train.log``; a
    warning when they are small for it. Returns ``node_size_status``'s dict."""
    strong = data.volumes("strong", "train", masks=True)
    spacing = config.data.spacing if config.data.fit in ("crop", "whole") else None
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


def budget_for_nodes(
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
