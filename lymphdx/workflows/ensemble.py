"""Fold ensembles: several trained runs scoring a scan together, as nnU-Net's five folds do.

Members (``resolve_members``): the runs given (``predict --model RUN --model RUN ...``), or
every run of one strategy in a compare folder (``--model COMPARE --strategy S``): each
repeat × fold × seed of ``COMPARE/cv`` (a ``compare --cv``), else each seed of
``COMPARE/runs`` (the fixed split). Every member must be a finished run (all epochs of
its config trained, ``best.pt`` there, no process training it), and all must draw the
ROI mask at the same ζ (``propagation.roi_threshold``) and, uncalibrated, label at the
same ``evaluation.threshold``; anything else is refused, naming the runs.

Averaging (``Ensemble.score``): the scan probability is the mean of the members'
uncalibrated probabilities (each the classifier's, or its mean with the run's ROI
readout), as nnU-Net averages its folds' softmax before any decision: the members'
calibration maps and thresholds were fitted on different patients, so a mean of
calibrated probabilities would sit at no member's operating point. The ROI probability
map is the mean of the members' maps on the scan's own grid, so members may prepare scans
differently (spacing, fit, shape, window): the scan is prepared once per distinct
``data`` setting, and a group's maps are averaged on its working grid and mapped back
once (the linear resampling commutes with the mean).

Calibration (``ensemble_calibration``): when the members are every run of one ``compare
--cv`` strategy, the mean is calibrated with that compare's ``calibration/<S>.json`` (the
map fitted on all out-of-fold predictions of those very runs, each scored on patients it
never trained on) and labelled at its operating point. It was fitted on single models'
probabilities; an average of models is usually a little less extreme, so the map is the
best available one, not an exact fit. Otherwise the mean stays uncalibrated and is
labelled at ``evaluation.threshold``, with a note (each member's own calibrated
probability is in ``prediction.json``'s ``ensemble.members``).

``evaluate_ensemble`` scores the ensemble and each member on a weak manifest's patients
that no member trained or selected on, and tests the ensemble against the single models'
mean AUC (``ensemble_metrics.json``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.errors import LymphdxError
from lymphdx.core.files import path_problem
from lymphdx.data.preprocess import settings_key
from lymphdx.data.scan_prep import PreparedScan
from lymphdx.engine.run_folder import load_run_config
from lymphdx.engine.run_state import (
    epochs_done,
    missing_checkpoint,
    refuse_while_busy,
    stale_reason,
)
from lymphdx.stats.calibration import Recalibration
from lymphdx.workflows.predict import (
    predict,
    predict_scans,
    scan_fields,
    threshold_fields,
    write_scan,
)
from lymphdx.workflows.run_scorer import RunScorer, ScanScore

__all__ = [
    "AVERAGED",
    "Ensemble",
    "EnsembleScore",
    "Members",
    "ensemble_calibration",
    "predict_ensemble",
    "predict_models",
    "resolve_members",
]

log = logging.getLogger("lymphdx")

AVERAGED = (
    "mean of the members' uncalibrated probabilities (as nnU-Net averages its folds' "
    "softmax) and of their ROI probability maps on the scan's own grid"
)


@dataclass(frozen=True)
class Members:
    """An ensemble's runs, in (repeat, fold, seed) order for a compare's; ``compare`` and
    ``strategy`` when they are every run of one strategy of a compare folder, ``cv`` when
    that compare cross-validated."""

    runs: list[Path]
    compare: Path | None = None
    strategy: str | None = None
    cv: bool = False


def _is_compare(folder: Path) -> bool:
    return not (folder / "config.yaml").exists() and (
        (folder / "cv").is_dir() or (folder / "runs").is_dir()
    )


def _order(run: Path) -> tuple[int, ...]:
    """(repeat, fold, seed) of ``cv/repeat<r>/fold<f>/<S>/seed<s>``; (seed,) of ``runs/``."""
    parts = (run.parent.parent.parent.name, run.parent.parent.name, run.name)
    numbers = [re.fullmatch(r"[a-z]+(\d+)", p) for p in parts]
    return tuple(int(m.group(1)) for m in numbers if m)


def _strategies_in(compare: Path) -> list[str]:
    names = {p.name for p in compare.glob("cv/repeat*/fold*/*") if p.is_dir()}
    names |= {p.name for p in compare.glob("runs/*") if p.is_dir()}
    return sorted(names)


def _runs_of(compare: Path, strategy: str) -> tuple[list[Path], bool]:
    """Every run folder of ``strategy`` in ``compare`` (the CV's when it has both) and
    whether they are a cross-validation's."""
    cv = sorted(compare.glob(f"cv/repeat*/fold*/{strategy}/seed*"), key=_order)
    fixed = sorted(compare.glob(f"runs/{strategy}/seed*"), key=_order)
    if cv and fixed:
        log.warning(
            "%s holds %s runs of a cross-validation and of the fixed split: the ensemble "
            "takes the cross-validation's",
            compare,
            strategy,
        )
    return (cv, True) if cv else (fixed, False)


def _compare_of(runs: list[Path]) -> Members:
    """``runs`` as given, recognised as every CV run of one strategy of a compare folder
    (``OUT/cv/repeat<r>/fold<f>/<S>/seed<s>``) when they are exactly that."""
    if not all(len(r.parents) > 4 and r.parents[3].name == "cv" for r in runs):
        return Members(runs)
    roots = {(r.parents[4], r.parent.name) for r in runs}
    if len(roots) == 1:
        compare, strategy = roots.pop()
        every, cv = _runs_of(compare, strategy)
        if cv and sorted(every) == sorted(runs):
            return Members(sorted(runs, key=_order), compare, strategy, True)
    return Members(runs)


def resolve_members(models: list[str | Path], strategy: str | None = None) -> Members:
    """The runs of an ensemble: ``models`` (run folders), or with ``strategy`` every run
    of that strategy in the one compare folder ``models`` holds. Raises ``LymphdxError``
    for anything else (a compare folder without ``strategy``, a strategy it does not
    hold, one run, a run given twice)."""
    paths = [Path(m).resolve() if path_problem(m) is None else Path(m) for m in models]
    if strategy is not None:
        if len(paths) != 1 or not _is_compare(paths[0]):
            raise LymphdxError(
                "--strategy picks the runs of one compare folder (an --out of `lymphdx "
                f"compare`): give that folder as the only --model; got {[str(p) for p in paths]}"
            )
        runs, cv = _runs_of(paths[0], strategy)
        if not runs:
            raise LymphdxError(
                f"compare folder {paths[0]} holds no runs of strategy {strategy!r}; it holds "
                f"{', '.join(_strategies_in(paths[0])) or 'no runs'}"
            )
        members = Members(runs, paths[0], strategy, cv)
    else:
        for p in paths:
            if _is_compare(p):
                raise LymphdxError(
                    f"{p} is a compare folder: give --strategy to make an ensemble of one "
                    f"of its strategies ({', '.join(_strategies_in(p))})"
                )
        members = _compare_of(paths)
    twice = sorted({str(r) for r in members.runs if members.runs.count(r) > 1})
    if twice:
        raise LymphdxError(f"run(s) given twice in the ensemble: {', '.join(twice)}")
    if len(members.runs) < 2:
        raise LymphdxError(
            f"an ensemble needs at least two runs, got {len(members.runs)} "
            f"({', '.join(map(str, members.runs))}); to predict with one run give it alone"
        )
    return members


def check_members(runs: list[Path]) -> None:
    """Refuse a member that is not a finished run, or members that disagree on ζ or on
    the uncalibrated threshold, naming the runs."""
    configs = {}
    for run in runs:
        configs[run] = load_run_config(run)  # not a run folder: said here
        refuse_while_busy(run, "use it in an ensemble")
        done, planned = epochs_done(run)
        if not (run / "checkpoints" / "best.pt").is_file():
            raise missing_checkpoint(run)
        if planned is not None and done < planned:
            raise LymphdxError(
                f"ensemble member {run} is unfinished: it stopped after {done} of {planned} "
                f"epochs; finish it (`lymphdx train --out {run} --resume`, or the compare "
                "again) before it joins an ensemble"
            )
    for what, key in (
        ("ROI mask threshold ζ (propagation.roi_threshold)", "roi"),
        ("uncalibrated threshold (evaluation.threshold)", "threshold"),
    ):
        values = {
            run: c.propagation.roi_threshold if key == "roi" else c.evaluation.threshold
            for run, c in configs.items()
        }
        if len(set(values.values())) > 1:
            listed = "; ".join(f"{run}: {v}" for run, v in values.items())
            raise LymphdxError(
                f"the ensemble's runs differ in their {what}, so their masks or labels "
                f"cannot be averaged into one: {listed}"
            )


def ensemble_calibration(
    members: Members,
) -> tuple[Recalibration, dict[str, Any] | None, str | None]:
    """The map and operating point of the members' mean (the compare's
    ``calibration/<S>.json`` when they are every run of one ``compare --cv`` strategy and
    it was fitted on their current scores), else the identity and a note why."""
    identity = Recalibration("none")
    own = "each member's own calibrated probability is in ensemble.members"
    if not members.cv or members.compare is None:
        return (
            identity,
            None,
            "uncalibrated: the members are not every run of one `compare --cv` strategy, "
            "whose pooled out-of-fold predictions calibrate such an ensemble "
            f"(calibration/<strategy>.json); the mean is labelled at evaluation.threshold; {own}",
        )
    path = members.compare / "calibration" / f"{members.strategy}.json"
    if not path.is_file():
        return identity, None, f"uncalibrated: {path} is missing (compare unfinished?); {own}"
    for run in members.runs:
        metrics, scored = run / "metrics.json", run / "predictions_test.csv"
        record = json.loads(metrics.read_text()).get("checkpoint") if metrics.is_file() else None
        stale = stale_reason(run, record, metrics) if metrics.is_file() else f"{run} is unscored"
        if stale is None and scored.is_file() and scored.stat().st_mtime > path.stat().st_mtime:
            stale = f"{run} was scored again after {path} was fitted"
        if stale is not None:
            return identity, None, f"uncalibrated: {stale}; run the compare again; {own}"
    record = json.loads(path.read_text())
    return Recalibration.from_json(record), record, None


@dataclass(frozen=True)
class EnsembleScore:
    """One scan scored by every member: the mean uncalibrated probability, its calibrated
    value, each member's ``ScanScore`` (in member order), the mean ROI map on the scan's
    own grid ``(z, y, x)`` float32 (``None`` when not asked for), and the scan as the
    first member prepared it."""

    uncalibrated: float
    probability: float
    members: list[ScanScore]
    roi: np.ndarray | None
    scan: PreparedScan

    @property
    def classifier(self) -> float:
        """The mean of the members' classifier probabilities."""
        return float(np.mean([m.classifier for m in self.members]))


def _one_or_all(values: list[Any]) -> Any:
    """The value the members share, else each member's."""
    return values[0] if all(v == values[0] for v in values) else values


@dataclass
class Ensemble:
    """The members' ``RunScorer``s and the ensemble's calibration (``load``)."""

    members: Members
    scorers: list[RunScorer]
    recalibration: Recalibration
    calibration: dict[str, Any] | None
    calibration_note: str | None
    groups: list[list[int]] = field(default_factory=list)

    @classmethod
    def load(cls, members: Members, domain: str = "weak") -> Ensemble:
        """Check the members (``check_members``), then load each run's weights."""
        check_members(members.runs)
        recalibration, record, note = ensemble_calibration(members)
        scorers = [RunScorer.load(run, domain) for run in members.runs]
        groups: dict[str, list[int]] = {}
        for i, scorer in enumerate(scorers):  # members that prepare a scan alike
            groups.setdefault(settings_key(scorer.config.data), []).append(i)
        return cls(members, scorers, recalibration, record, note, list(groups.values()))

    def score(
        self,
        image_path: Path,
        patient: str | None = None,
        series_uid: str | None = None,
        roi: bool = True,
    ) -> EnsembleScore:
        """Every member's score of the scan and their mean (with ``roi``, also the mean
        ROI map on the scan's own grid)."""
        scores: list[ScanScore | None] = [None] * len(self.scorers)
        first: PreparedScan | None = None
        total: np.ndarray | None = None
        for group in self.groups:
            scan = self.scorers[group[0]].prepare(image_path, patient, series_uid)
            first = first or scan
            for i in group:
                scores[i] = self.scorers[i].score(scan)
            if roi:  # to_original is linear: map the group's mean once
                maps = np.mean([scores[i].roi for i in group], axis=0)  # type: ignore[union-attr]
                mapped = scan.to_original(maps.astype(np.float32)) * len(group)
                total = mapped if total is None else total + mapped
        done = [s for s in scores if s is not None]
        mean = float(np.mean([s.uncalibrated for s in done]))
        probability = float(self.recalibration(np.array([mean]))[0])
        average = None if total is None else (total / len(done)).astype(np.float32)
        assert first is not None
        return EnsembleScore(mean, probability, done, average, first)

    def common(self) -> dict[str, Any]:
        """``prediction.json``'s fields that every scan shares (``predict.scan_fields``)."""
        configs = [s.config for s in self.scorers]
        m = self.members
        return {
            "model": str(m.compare) if m.compare else [str(r) for r in m.runs],
            "checkpoint": None,  # one per member: ensemble.members
            "strategy": _one_or_all([c.strategy for c in configs]),
            **threshold_fields(configs[0], self.calibration, self.calibration_note),
            "roi_threshold": configs[0].propagation.roi_threshold,
            "tta_flip": _one_or_all([bool(c.evaluation.tta_flip) for c in configs]),
            "inferer": _one_or_all([s.inferer.name for s in self.scorers]),
            "roi_readout": _one_or_all([s.readout_note for s in self.scorers]),
        }

    def record(self, scored: EnsembleScore) -> dict[str, Any]:
        """``prediction.json``'s ``ensemble``: the members and their probabilities."""
        m = self.members
        return {
            "n": len(self.scorers),
            "averaged": AVERAGED,
            "source": None
            if m.compare is None
            else {"compare": str(m.compare), "strategy": m.strategy, "cross_validation": m.cv},
            "calibration": (
                f"calibration/{m.strategy}.json of {m.compare}: fitted on the pooled "
                "out-of-fold predictions of these runs"
                if self.calibration is not None
                else self.calibration_note
            ),
            "members": [
                {
                    "run": str(scorer.run_dir),
                    "checkpoint": scorer.state["source"],  # file, sha256, epoch
                    "probability_uncalibrated": score.uncalibrated,
                    "probability": score.probability,  # with the run's own calibration.json
                    "classifier_probability": score.classifier,
                    "probability_calibration": scorer.calibration_note
                    or (scorer.calibration or {}).get("method"),
                }
                for scorer, score in zip(self.scorers, scored.members, strict=True)
            ],
        }


def predict_ensemble(
    models: list[str | Path],
    images: list[str | Path],
    out_dir: str | Path,
    strategy: str | None = None,
    domain: str = "weak",
    patients: list[str | None] | None = None,
    progress: bool = False,
    series_uid: str | None = None,
) -> list[dict[str, Any]]:
    """``predict`` with the ensemble of ``models`` (``resolve_members``): the same files
    per scan and ``summary.csv``; ``prediction.json`` adds ``ensemble``."""
    ensemble = Ensemble.load(resolve_members(models, strategy), domain)
    if ensemble.calibration_note is not None:
        log.warning("%s", ensemble.calibration_note)
    common = ensemble.common()

    def one(image_path: Path, folder: Path, patient: str | None) -> dict[str, Any]:
        scored = ensemble.score(image_path, patient, series_uid)
        result = {
            "image": str(image_path),
            "probability": scored.probability,
            "label": int(scored.probability >= common["threshold"]),
            **scan_fields(scored.uncalibrated, scored.classifier, common, scored.scan),
            "ensemble": ensemble.record(scored),
        }
        assert scored.roi is not None
        return write_scan(folder, scored.scan, scored.roi, result, image_path, patient, series_uid)

    return predict_scans(one, images, out_dir, patients, progress)


def predict_models(
    models: list[str | Path], images: list[str | Path], out_dir: str | Path, **options: Any
) -> list[dict[str, Any]]:
    """``predict --model``: one run folder alone (``predict.predict``), else an ensemble
    (``predict_ensemble``; ``options["strategy"]`` for a compare folder)."""
    strategy = options.pop("strategy", None)
    if strategy is None and len(models) == 1 and not _is_compare(Path(models[0])):
        return predict(models[0], images, out_dir, **options)
    return predict_ensemble(models, images, out_dir, strategy, **options)
