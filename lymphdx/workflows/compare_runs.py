"""One run of a comparison, wherever it is trained: ``run_one`` trains (resuming an
interrupted run) and scores it, ``finished`` tells a finished run, ``reuse_finished`` keeps
one; ``warm_cache`` fills the preprocessing cache before runs start side by side and
``expected_cost`` orders them. ``compare`` and its executors (``workflows.executors``)
share them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lymphdx.core.config import Config, dump_config, validate
from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import write_text
from lymphdx.core.strategies import get_strategy
from lymphdx.data.manifest import load_manifests
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.engine.run_data import cache_dir_of, resolve_manifests
from lymphdx.engine.run_folder import config_differences, load_run_config
from lymphdx.engine.run_state import epochs_done, refuse_while_busy, stale_reason
from lymphdx.engine.train import train
from lymphdx.workflows.calibrate import CALIBRATION_FILE
from lymphdx.workflows.evaluate import evaluate_run, scoring_settings

__all__ = ["expected_cost", "finished", "reuse_finished", "run_one", "warm_cache"]


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished, scored run: ``metrics.json``, and every epoch
    of its ``config.yaml`` in ``history.csv`` (a run evaluated after it was stopped early
    is not finished: ``run_one`` resumes it)."""
    if not (run_dir / "metrics.json").exists():
        return False
    done, planned = epochs_done(run_dir)
    return planned is None or done >= planned


def run_one(
    config: Config,
    run_dir: Path,
    weak_csv: Path,
    strong_csv: Path,
    progress: bool,
    detection: bool = True,
) -> None:
    """Train ``run_dir`` (resuming an interrupted run) and evaluate it on the test split.
    A run that finished earlier (``finished``) is kept (compare is resumable), and only
    scored again when its scores are stale or the ``evaluation`` settings changed
    (``reuse_finished``)."""
    if finished(run_dir):
        reuse_finished(config, run_dir, weak_csv, strong_csv, detection)
        return
    resume = (run_dir / "config.yaml").exists()
    train(config, run_dir, weak_csv, strong_csv, resume=resume, progress=progress)
    evaluate_run(run_dir, "test", detection=detection)


def _rescoring_unfinished(recorded: Any, now: dict[str, dict[str, Any]]) -> list[str]:
    """The ``section.key`` settings whose value in ``metrics.json``'s ``scored_with``
    (``recorded``) differs from the run's config (``now``). Keys it does not record (it
    predates them, or an older lymphdx wrote it) are not compared: a key added with a
    default keeps the scoring it names."""
    if not isinstance(recorded, dict):
        return []
    return [
        f"{section}.{key}"
        for section, values in recorded.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if key in now.get(section, {}) and now[section][key] != value
    ]


def reuse_finished(
    config: Config, run_dir: Path, weak_csv: Path, strong_csv: Path, detection: bool = True
) -> str | None:
    """Keep a finished run: refuse it when it was trained with other settings than
    ``config`` (``config_differences``), and score it again (``evaluate_run``) when its
    ``metrics.json`` does not come from its current ``best.pt`` (``stale_reason``: e.g.
    evaluated while it was still training), or with ``config``'s ``evaluation`` and
    ``inference`` sections when only they differ, which changes no weight. Returns why it
    was scored again (``None``: it was not). Refused while another process trains it."""
    refuse_while_busy(run_dir, "run compare again")
    saved = load_run_config(run_dir)
    wanted = resolve_manifests(config, weak_csv, strong_csv)
    differ = config_differences(saved, wanted)
    trained = config_differences(saved, wanted, weights_only=True)
    if trained:
        raise LymphdxError(
            f"{run_dir} holds a finished run trained with other settings "
            f"({'; '.join(trained)}); give compare another --out, or remove that run "
            "folder to train it again"
        )
    metrics = run_dir / "metrics.json"
    try:
        scored = json.loads(metrics.read_text())
        record = scored.get("checkpoint")
    except (OSError, ValueError, AttributeError):  # unreadable: scored again below
        record, stale = None, f"{metrics.name} is unreadable"
    else:
        stale = stale_reason(run_dir, record, metrics)
        if stale is None and not (run_dir / CALIBRATION_FILE).is_file():
            stale = f"no {CALIBRATION_FILE} (scored before probabilities were calibrated)"
        changed = _rescoring_unfinished(scored.get("scored_with"), scoring_settings(saved))
        if stale is None and changed:
            stale = (
                f"{metrics.name} was scored with other settings than the run's config.yaml "
                f"({', '.join(changed)}): a rescoring stopped part-way"
            )
    if not differ and stale is None:
        return None
    if differ:
        data = saved.model_dump(mode="json")
        for section in ("evaluation", "inference"):  # how it is scored, not trained
            data[section] = wanted.model_dump(mode="json")[section]
        write_text(run_dir / "config.yaml", dump_config(validate(data)))
        for cached in run_dir.glob("predictions_*@*.csv"):  # predict_checkpoint's, now stale
            cached.unlink()
    evaluate_run(run_dir, "test", detection=detection)
    return "evaluation settings changed" if differ else stale


def warm_cache(config: Config, weak_csv: Path, strong_csv: Path) -> None:
    """Preprocess every scan and mask once, before parallel runs read the cache."""
    weak, strong = load_manifests(weak_csv, strong_csv)
    cache = PreprocessCache(cache_dir_of(config), config.data)
    for w in weak:
        cache.image(w.image, w.patient_id)
    for s in strong:
        cache.image(s.image, s.patient_id)
        cache.mask(s.mask, s.image, s.patient_id)


def expected_cost(config: Config) -> float:
    """A run's training time relative to a supervised run of as many epochs (measured on
    the 14-epoch demo of docs/dev-log-2026-11-25_to_2026-12-03.md §2: supervised 1,
    semi-supervised and multitask about 1.3, ssmdmt about 1.6): each extra loss on the strong
    set adds about 0.3."""
    strategy = get_strategy(config.strategy)
    extra = 0.3 * strategy.roi_strong + 0.3 * strategy.pseudo_cls_strong
    return config.training.epochs * (1.0 + extra)
