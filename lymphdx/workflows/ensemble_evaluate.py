"""Score a fold ensemble and each of its members on new patients: ``ensemble_metrics.json``.

``lymphdx evaluate COMPARE --strategy S --weak MANIFEST`` (or several run folders and
``--out``): every patient of the weak manifest is scored by every member and by the
ensemble (``workflows.ensemble``: the mean of the members' uncalibrated probabilities).
The patients must be new to every member: a patient whose scan (by content, SHA-256) is
one a member trained or selected on (its ``splits.csv``'s train or val, weak or strong
set) is refused. Ids alone do not count: a fresh synthetic seed reuses the ids
``W0001``... for other scans, which is noted.

The comparison the ensemble is judged by is against *the single models' mean*: the mean
AUC of the members, each alone, on the same patients (what one gets from one fold model
picked at random). ``vs_members_mean`` holds ΔAUC = AUC(ensemble) − mean AUC(members)
with DeLong's test of that contrast of K + 1 correlated AUCs (``stats.metrics.
delong_contrast``) and a paired stratified bootstrap interval (every resample scores the
ensemble and all members on the same patients); ``vs_each_member`` holds DeLong's paired
test against each member (not adjusted for multiplicity). AUCs are those of the
uncalibrated probabilities; the calibrated ensemble probability gives the operating point
and the calibration statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import write_csv, write_json
from lymphdx.data.manifest import WeakRecord, load_strong_manifest, load_weak_manifest
from lymphdx.data.preprocess import PreprocessCache
from lymphdx.data.splits import read_splits_csv
from lymphdx.engine.run_data import cache_dir_of
from lymphdx.stats.calibration import calibration_stats
from lymphdx.stats.metrics import (
    auc,
    bootstrap_auc_ci,
    delong,
    delong_contrast,
    delong_paired,
    paired_bootstrap_delta_ci,
)
from lymphdx.stats.operating_point import at_threshold
from lymphdx.workflows.ensemble import AVERAGED, Ensemble, Members, resolve_members
from lymphdx.workflows.evaluate import evaluate_run

__all__ = ["ENSEMBLE_METRICS", "ensemble_statistics", "evaluate_ensemble", "evaluate_models"]

log = logging.getLogger("lymphdx")

ENSEMBLE_METRICS = "ensemble_metrics.json"
ENSEMBLE_PREDICTIONS = "ensemble_predictions.csv"


def ensemble_statistics(
    y: np.ndarray,
    ensemble: np.ndarray,
    members: np.ndarray,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """AUCs of the ensemble's scores ``(N,)`` and of each member's ``(K, N)`` on labels
    ``y`` ``(N,)``, and the ensemble against the members' mean AUC and against each."""
    k = len(members)
    member_auc = [auc(y, m) for m in members]
    mean = float(np.mean(member_auc))
    contrast = delong_contrast(y, np.vstack([ensemble, members]), np.r_[1.0, np.full(k, -1 / k)])
    lo, hi = paired_bootstrap_delta_ci(y, ensemble, members, n_boot, ci, seed)
    _, var = delong(y, ensemble)
    value = auc(y, ensemble)
    return {
        "auc": value,
        "auc_ci95": list(bootstrap_auc_ci(y, ensemble, n_boot, ci, seed)),
        "auc_se_delong": float(np.sqrt(var)),
        "members_auc": member_auc,
        "members_auc_mean": mean,
        "members_auc_sd": float(np.std(member_auc, ddof=1)) if k > 1 else 0.0,
        "vs_members_mean": {
            "reference": "the mean AUC of the members, each alone, on the same patients",
            "delta_auc": value - mean,
            "delta_ci95_bootstrap": [lo, hi],
            "p_delong": contrast["p"],
            "se_delong": contrast["se"],
            "delta_ci95_delong": contrast["ci95"],
        },
        "vs_each_member": [delong_paired(y, ensemble, m).to_dict() for m in members],
    }


def _seen_scans(ensemble: Ensemble) -> tuple[dict[str, str], set[str], list[str]]:
    """``{content hash: who}`` of every scan a member trained or selected on (train or val
    in its ``splits.csv``, weak or strong set), those patients' ids, and notes on what
    could not be checked."""
    hashes: dict[tuple[str, str], dict[str, str]] = {}  # (set, manifest) -> {pid: hash}
    seen: dict[str, str] = {}
    ids: set[str] = set()
    notes: list[str] = []
    for scorer in ensemble.scorers:
        config, run = scorer.config, scorer.run_dir
        cache = PreprocessCache(cache_dir_of(config), config.data)
        splits = read_splits_csv(run / "splits.csv")
        used = {key: e.split for key, e in splits.items() if e.split in ("train", "val")}
        ids |= {pid for _, pid in used}
        for set_name, csv in (("weak", config.manifests.weak), ("strong", config.manifests.strong)):
            if not csv:
                continue
            if (set_name, csv) not in hashes:
                load = load_weak_manifest if set_name == "weak" else load_strong_manifest
                try:
                    records = load(csv)
                except LymphdxError as err:
                    notes.append(f"{run}'s {set_name} manifest was not checked: {err}")
                    hashes[(set_name, csv)] = {}
                    continue
                hashes[(set_name, csv)] = {
                    r.patient_id: cache.content_hash(r.image, r.patient_id) for r in records
                }
            for pid, digest in hashes[(set_name, csv)].items():
                if (set_name, pid) in used:
                    seen.setdefault(
                        digest, f"{set_name} patient {pid!r} ({used[(set_name, pid)]}) of {run}"
                    )
    return seen, ids, notes


def check_unseen(ensemble: Ensemble, records: list[WeakRecord], csv: Path) -> dict[str, Any]:
    """Refuse a patient of ``records`` whose scan a member trained or selected on;
    returns what was checked (``unseen_check`` of ``ensemble_metrics.json``)."""
    seen, ids, notes = _seen_scans(ensemble)
    config = ensemble.scorers[0].config
    cache = PreprocessCache(cache_dir_of(config), config.data)
    clashes = []
    for r in records:
        who = seen.get(cache.content_hash(r.image, r.patient_id))
        if who is not None:
            clashes.append(f"patient {r.patient_id!r} ({r.image}) is {who}")
    if clashes:
        raise InputError(
            f"{len(clashes)} of its {len(records)} patients are scans the ensemble's models "
            "trained or selected on, so they would not test it: "
            + "; ".join(clashes[:5])
            + ("; ..." if len(clashes) > 5 else "")
            + ". Give a manifest of patients none of the runs saw",
            csv,
        )
    same_ids = sorted({r.patient_id for r in records} & ids)
    if same_ids:
        notes.append(
            f"{len(same_ids)} patient ids (e.g. {same_ids[0]!r}) also name patients the "
            "members trained or selected on, but their scans differ: scored as new patients"
        )
    for note in notes:
        log.warning("%s", note)
    return {"by": "scan content (SHA-256)", "patients_seen_by_a_member": 0, "notes": notes}


def _out_folder(members: Members, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    if members.compare is None:
        raise LymphdxError(
            "give --out: where to write ensemble_metrics.json for an ensemble of run folders"
        )
    return members.compare / "ensemble" / str(members.strategy)


def evaluate_ensemble(
    models: list[str | Path],
    weak_csv: str | Path,
    strategy: str | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Score the ensemble of ``models`` (``resolve_members``) and each member on every
    patient of the weak manifest ``weak_csv``; writes ``OUT/ensemble_metrics.json`` and
    ``OUT/ensemble_predictions.csv`` (``OUT``: ``out``, else ``COMPARE/ensemble/<S>``)
    and returns the metrics."""
    members = resolve_members(models, strategy)
    folder = _out_folder(members, out)
    records = load_weak_manifest(weak_csv)
    ensemble = Ensemble.load(members, "weak")
    unseen = check_unseen(ensemble, records, Path(weak_csv))
    scores = [ensemble.score(r.image, r.patient_id, roi=False) for r in records]
    y = np.array([r.label for r in records], dtype=int)
    mean = np.array([s.uncalibrated for s in scores])
    calibrated = np.array([s.probability for s in scores])
    each = np.array([[m.uncalibrated for m in s.members] for s in scores]).T  # (K, N)
    ev, seed = ensemble.scorers[0].config.evaluation, ensemble.scorers[0].config.seed
    common = ensemble.common()
    threshold = common["threshold"]
    metrics: dict[str, Any] = {
        "manifest": str(Path(weak_csv).resolve()),
        "n": len(y),
        "n_pos": int(y.sum()),
        "averaged": AVERAGED,
        "members": [
            {"run": str(s.run_dir), "checkpoint": s.state["source"]} for s in ensemble.scorers
        ],
        "source": ensemble.record(scores[0])["source"],
        **ensemble_statistics(y, mean, each, ev.bootstrap, ev.ci, seed),
        "threshold": threshold,
        "operating_point": {
            **common["operating_point"],
            **at_threshold(y, calibrated, threshold, ev.ci),
        },
        "calibration": {
            **common["probability_calibration"],
            "before": calibration_stats(y, mean, ev.bootstrap, ev.ci, seed),
            "after": calibration_stats(y, calibrated, ev.bootstrap, ev.ci, seed),
        },
        "unseen_check": unseen,
    }
    header = ["patient_id", "label", "probability", "probability_uncalibrated"]
    header += [f"member{i + 1}" for i in range(len(each))]
    rows = [
        [r.patient_id, r.label, f"{calibrated[j]:.6f}", f"{mean[j]:.6f}"]
        + [f"{p:.6f}" for p in each[:, j]]
        for j, r in enumerate(records)
    ]
    write_csv(folder / ENSEMBLE_PREDICTIONS, header, rows)
    write_json(folder / ENSEMBLE_METRICS, metrics)
    return metrics


def evaluate_models(
    runs: list[Path],
    split: str | None = None,
    strategy: str | None = None,
    weak: Path | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """``lymphdx evaluate``: one run on its own ``split`` (``evaluate_run``), or with
    ``weak`` an ensemble on that manifest's patients (``evaluate_ensemble``)."""
    if weak is None:
        if strategy is not None or out is not None or len(runs) != 1:
            raise LymphdxError(
                "--strategy, --out and several folders score an ensemble on new patients: "
                "give --weak MANIFEST (to evaluate one run on its own split, give it alone)"
            )
        return evaluate_run(runs[0], split or "test")
    if split is not None:
        raise LymphdxError(
            "--split scores a run's own split; with --weak every patient of the manifest "
            "is scored: leave --split out"
        )
    return evaluate_ensemble(runs, weak, strategy, out)
