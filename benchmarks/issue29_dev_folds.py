"""Issue 29: choose the clinical preset's budget on seed 0's development folds.

The weak set's fixed split (``OUT/splits.csv``, the one every other command draws) keeps
its ``test`` patients out: they are not in ``OUT/development_weak.csv``, the manifest every
run here trains and is scored on. The development patients (train + val) are split into
``--folds`` stratified folds (``workflows.folds.cv_folds``, as ``compare --cv`` does); in
each fold a run of the preset is trained to ``--epochs[0]`` epochs and scored on the
fold's held-out patients, then a copy is trained on to each further budget and scored
again (no learning-rate schedule: a run trained on from epoch 10 to 20 is a 20-epoch run).
Detection is not scored here (the strong set's test split stays untouched).

    python benchmarks/issue29_dev_folds.py run DATA OUT --fold 0   # one fold; resumable
    python benchmarks/issue29_dev_folds.py summary DATA OUT        # pooled OOF per budget
    python benchmarks/issue29_dev_folds.py readout DATA OUT --epochs 20   # the readout arm
    python benchmarks/issue29_dev_folds.py summary DATA OUT --epochs 20 20r
    python benchmarks/issue29_dev_folds.py readout DATA OUT --epochs 20 --arm n  # nodes
    python benchmarks/issue29_dev_folds.py summary DATA OUT --epochs 20r 20n

A training arm (``arm``, sixth session, 2026-12-07): each fold's run trained from scratch
with the config ``--config FILE`` (the preset and the settings the arm changes) in
``e<E><name>`` and scored on the same held-out patients by ``evaluate``:

    python benchmarks/issue29_dev_folds.py arm DATA OUT --fold 0 --name a --config a.yaml
    python benchmarks/issue29_dev_folds.py arm DATA OUT --fold 0 --name b --config b.yaml
    python benchmarks/issue29_dev_folds.py arm DATA OUT --fold 0 --name c --config c.yaml
    python benchmarks/issue29_dev_folds.py arm DATA OUT --fold 0 --name d --config d.yaml

Arm ``a`` (nnU-Net's simulated low resolution and gamma, ``training.augmentation``:
``low_res_prob: 0.25``, ``low_res_zoom: [0.5, 1]``, ``gamma_prob: 0.3``, ``gamma_range:
[0.7, 1.5]``; the clinical preset otherwise, its node readout). Why: the default data's
fold 2 fails on the decoder's false regions on the weak hospital's scans, whose
acquisition is coarser and smoother than the strong hospital's the decoder learns on.
Rule declared before it ran: the clinical preset takes these settings when the arm's
pooled out-of-fold AUC is higher than that of ``e20n`` scored by today's code (the
copies ``dev<F>_t`` of ``benchmarks/issue29_rescore.py copy``) and the mean over the folds
of its decoder Dice on the strong training + validation scans is not lower.

Arm ``b`` (seventh session, 2026-12-08): the same two transforms on the bags' tiles only
(``training.bag_augmentation``: ``low_res_prob: 0.25``, ``low_res_zoom: [0.5, 1]``,
``gamma_prob: 0.3``, ``gamma_range: [0.7, 1.5]``); the ROI patches are augmented as the
preset's. Why: arm ``a`` lifted σ alone on both folds (0.55, 0.46 to 0.71, 0.68) while its
harder patches cost the decoder 0.075 of Dice. Rule declared before it ran: the clinical
preset takes ``bag_augmentation`` when the arm's pooled out-of-fold AUC is higher than
that of ``e20n`` scored by today's code (0.758) and the mean over the folds of its decoder
Dice on the strong training + validation scans is no more than 0.02 below ``e20n``'s
(0.671; the patches' augmentation is unchanged, so a lower Dice would be noise: the two
folds of ``e20n`` differ by 0.025).

Arm ``c`` (seventh session, 2026-12-08): the refresh's sliding window without overlap
(``training.bag_refresh_overlap: 0``) on the preset as arm ``b``'s rule leaves it (with
``bag_augmentation`` if ``b`` is adopted). Why: the refreshes are most of a clinical run's
time, and overlap 0 maps a scan in half the time (``benchmarks/refresh_overlap.py``: 2.5
against 5.1 s); it finds 49 of the 80 peaks again, against 58 for overlap 0.5, so whether
the bags teach as well is a question for the learning curves. Rule declared before it
ran: the preset takes overlap 0 when the arm's training time (history.csv's seconds,
summed over both folds, run as a pair at one thread each as arm ``b`` was) is lower than
arm ``b``'s, and its pooled out-of-fold AUC and its mean decoder Dice are each no more
than 0.02 below those of the arm it changes (``b`` if adopted, else ``e20n``). The
per-epoch curves (validation AUC, strong Dice, the bags' peak probability) are shown
beside.

Arm ``d`` (seventh session, 2026-12-08): arm ``b``'s config (the preset since) with
nnU-Net's poly learning-rate schedule (``training.lr_schedule: poly``). Why: arms ``b``
and ``c`` differ only in where the bags' tiles lie, yet their fold AUCs differ by +0.09
and −0.33, and ``c``'s fold 1 decoder fell from Dice 0.70 to 0.45 over its last
validations: with a constant rate a run ends wherever its last steps leave it. Rule
declared before it ran: the preset takes ``poly`` when the arm's pooled out-of-fold AUC
and its mean decoder Dice are each no more than 0.02 below arm ``b``'s (0.828; 0.669) and
its strong-validation Dice varies less over the last four validations (max − min, mean
over the folds; arm ``b``: 0.229 and 0.060, mean 0.145).

The eighth session (2026-12-08) starts no new arm before it knows why arm ``d``'s fold 1
decoder scored Dice 0.009 in eval mode while its training loss equalled fold 0's. It
trains again, from scratch, arm ``d``'s fold 1 (``d.yaml``: ``preset: clinical``,
``training: {lr_schedule: poly}``) and, beside it, the preset itself on fold 1 with
training seed 1 (``--seed 1``, ``e20p/seed1``: a replicate, the first of the two seeds
per arm that later rules read), then scores both with ``benchmarks/bn_stats_probe.py``:
the same weights with the batch-norm statistics re-estimated on the strong ROI patches
alone. Declared before the runs: the running statistics are the cause when the
re-estimated ones lift ``d``'s fold 1 decoder Dice on the strong training + validation
scans to at least 0.4 (the propagation gate); re-estimation then becomes a candidate
component, judged on both folds by its own rule, written before it is scored.

Mid-run (04:28 UTC), ``bn_stats_probe.py --model ema`` on ``d``'s fold 1 at epoch 12:
decoder Dice 0.076 with the EMA's running statistics, 0.666 with statistics re-estimated
on the strong ROI patches, the same weights. So ``evaluation.bn_stats: roi_patches``
(``engine.patch_stats``) is the candidate. Rule declared before any run is rescored with
it: the clinical preset takes ``bn_stats: roi_patches`` when, on the preset's replicate
``e20p/seed1`` (folds 0 and 1; copies rescored by ``issue29_rescore.py copy ... --set
bn_stats=roi_patches``), the pooled out-of-fold AUC is no more than 0.02 below that of the
same runs scored with their trained statistics, and the mean over the folds of the
decoder Dice (strong training + validation scans, each with the statistics it is scored
with) is no more than 0.02 lower. ``d``'s fold 1, rescored the same way, is reported
beside it.

The probe of ``d``'s fold 1 at its end (best.pt): Dice 0.009 with the running statistics,
0.703 with the ROI patches' alone, 0.000 with the weak tiles' alone, 0.012 with an equal
mix of both re-estimated for these weights. The mix, not stale statistics, is the cause.
So ``training.running_stats: patches`` (``engine/running_stats.py``: the scans' or bags'
pass leaves the running statistics alone) should keep training's own eval-mode passes
(validation, the bags' refresh) right. A mechanism check, not an adoption rule
(``dq``: ``d.yaml`` with ``running_stats: patches``, fold 1, training seed 0, so paired
with ``d``'s fold 1 run): expected, declared before it ran, a strong-validation Dice that
stays at or above 0.4 from epoch 6 on (``d``: 0.04 at epoch 10, 0.003 at epoch 18) and a
decoder Dice at the end (running statistics, ``roi_status.json``) of at least 0.6.
Adopting it needs both folds of the preset's config, next.

Run the folds in parallel with ``OMP_NUM_THREADS=1`` each on a 2-core machine. The
summary gives, per budget, the pooled out-of-fold AUC with its bootstrap CI, DeLong's
paired test between budgets, and the decoder's Dice on the strong training + validation
scans (``roi_status.json``). Rule declared before the runs: the longer budget is adopted
when its pooled AUC is higher and its decoder Dice is not lower; otherwise the shorter.

The readout arm (``readout``, second round, 2026-12-07): each fold's run of the chosen
budget, copied to ``e<E>r`` with ``evaluation.roi_readout: true`` in its ``config.yaml``
(the weights are the same; the readout is fitted on the fold's weak training patients by
``evaluate``) and scored on the same held-out patients. Rule declared before it ran: the
clinical preset turns the readout on when the pooled out-of-fold AUC of ``e<E>r`` is
higher than that of ``e<E>``; otherwise it stays off.

The node readout (third round, 2026-12-07; ``--arm n``, ``e<E>n``): chosen on the same
folds by ``benchmarks/issue29_scan_heads.py`` from the runs' stored maps (its rule is in
its docstring); ``e<E>n`` scores the chosen setting (``evaluation.readout: nodes``,
``readout_weight: 1``) through ``evaluate`` itself, the figure BENCHMARKS.md gives.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from lymphdx.core.config import load_config
from lymphdx.engine.roi_status import read_roi_status
from lymphdx.engine.run_data import split_manifests
from lymphdx.stats.metrics import auc, bootstrap_auc_ci, delong_paired
from lymphdx.workflows import folds as cv
from lymphdx.workflows.ablation import write_development_manifest
from lymphdx.workflows.evaluate import evaluate_run, read_predictions


def _config_text(preset: str, epochs: int) -> str:
    return f"preset: {preset}\ntraining:\n  epochs: {epochs}\n"


def _paths(data: Path) -> tuple[Path, Path]:
    return data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"


def _fold_dirs(
    data: Path,
    out: Path,
    preset: str,
    k: int,
    first: int,
    arm: Path | None = None,
    name: str = "",
    seed: int = 0,
) -> list[Path]:
    """The folds' run folders of the first budget (or of an ``arm``'s config file, named
    ``e<first><name>``), each with its ``splits.csv`` written."""
    weak_csv, strong_csv = _paths(data)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / f"e{first}{name}.yaml"
    if arm is None:
        cfg_file.write_text(_config_text(preset, first))
    elif arm.resolve() != cfg_file.resolve():
        shutil.copyfile(arm, cfg_file)
    config = load_config(cfg_file)
    weak, strong = split_manifests(config, weak_csv, strong_csv, out)
    development = [w for w in weak if w.split != "test"]
    write_development_manifest(development, out / "development_weak.csv")
    folds = cv.cv_folds(config, development, k, 1)
    runs = cv.fold_runs(
        out, folds, development, strong, [f"e{first}{name}"], [seed], lambda n, s: config
    )
    return [r.run_dir for r in runs]


def _train(run: Path, cfg: Path, out: Path, data: Path, seed: int = 0) -> None:
    if (run / "predictions_test.csv").exists():
        return
    resume = ["--resume"] if (run / "checkpoints" / "last.pt").exists() else []
    cmd = [
        "lymphdx", "train", "--weak", str(out / "development_weak.csv"),
        "--strong", str(_paths(data)[1]), "--strategy", "multitask",
        "--config", str(cfg), "--out", str(run), "--seed", str(seed), *resume,
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    evaluate_run(run, "test", detection=False)


def run_fold(data: Path, out: Path, preset: str, k: int, fold: int, budgets: list[int]) -> None:
    first = _fold_dirs(data, out, preset, k, budgets[0])[fold]
    _train(first, out / f"e{budgets[0]}.yaml", out, data)
    previous = first
    for epochs in budgets[1:]:
        cfg = out / f"e{epochs}.yaml"
        cfg.write_text(_config_text(preset, epochs))
        run = first.parent.parent / f"e{epochs}" / "seed0"
        if not run.exists():  # trained on from the previous budget's last epoch
            shutil.copytree(previous, run)
            for name in ("metrics.json", "roi_status.json", "predictions_test.csv"):
                (run / name).unlink(missing_ok=True)
        _train(run, cfg, out, data)
        previous = run


def train_arm(
    data: Path, out: Path, k: int, fold: int, name: str, arm: Path, seed: int = 0
) -> None:
    """Fold ``fold``'s run of the arm's config ``arm`` (its ``training.epochs`` the budget),
    trained from scratch with training seed ``seed`` in ``e<epochs><name>/seed<seed>`` and
    scored (resumable)."""
    epochs = load_config(arm).training.epochs
    run = _fold_dirs(data, out, "", k, epochs, arm, name, seed)[fold]
    _train(run, out / f"e{epochs}{name}.yaml", out, data, seed)


# readout arms: the run folder's suffix and the evaluation settings it scores with
ARMS = {
    "r": {"roi_readout": True},  # the map's readout, averaged (second round)
    "n": {"roi_readout": True, "readout": "nodes", "readout_weight": 1.0},  # third round
    "nm": {"roi_readout": True, "readout": "nodes", "readout_weight": 0.5},
}


def readout_arm(out: Path, epochs: int, arm: str = "r") -> None:
    """Each fold's ``e<epochs>`` run copied to ``e<epochs><arm>`` with the arm's readout
    settings (``ARMS``), scored on the fold's held-out patients (resumable)."""
    for first in sorted(out.glob(f"cv/repeat0/fold*/e{epochs}/seed0")):
        run = first.parent.parent / f"e{epochs}{arm}" / "seed0"
        if (run / "predictions_test.csv").exists():
            continue
        if not run.exists():
            shutil.copytree(first, run)
        for name in ("metrics.json", "predictions_test.csv", "roi_readout.json"):
            (run / name).unlink(missing_ok=True)
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.setdefault("evaluation", {}).update(ARMS[arm])
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        evaluate_run(run, "test", detection=False)


def summary(out: Path, budgets: list[str]) -> dict:
    rows: dict[str, dict[str, tuple[int, float]]] = {}
    dice: dict[str, list[float]] = {}
    for epochs in budgets:
        for run in sorted(out.glob(f"cv/repeat0/fold*/e{epochs}/seed0")):
            if (run / "predictions_test.csv").exists():
                rows.setdefault(epochs, {}).update(read_predictions(run / "predictions_test.csv"))
                status = read_roi_status(run) or {}
                if (d := status.get("dice")) is not None:
                    dice.setdefault(epochs, []).append(float(d))
    result: dict = {"budgets": {}}
    common = sorted(set.intersection(*(set(r) for r in rows.values()))) if rows else []
    for epochs, r in rows.items():
        y = np.array([r[p][0] for p in common])
        s = np.array([r[p][1] for p in common])
        result["budgets"][epochs] = {
            "n": len(common),
            "n_pos": int(y.sum()),
            "pooled_oof_auc": auc(y, s),
            "ci95": list(bootstrap_auc_ci(y, s[None], 2000, 0.95, 0)),
            "decoder_dice_strong_train_val": dice.get(epochs),
        }
    if len(rows) >= 2 and common:
        a, b = budgets[-1], budgets[0]
        y = np.array([rows[a][p][0] for p in common])
        test = delong_paired(y, np.array([rows[a][p][1] for p in common]),
                             np.array([rows[b][p][1] for p in common]))  # fmt: skip
        result[f"e{a} vs e{b}"] = {"delta_auc": test.delta, "p_delong": test.p}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "readout", "arm", "summary"))
    parser.add_argument("data", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="clinical")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--arm", choices=sorted(ARMS), default="r", help="readout: the arm")
    parser.add_argument("--name", default="a", help="arm: the run folders' suffix")
    parser.add_argument("--config", type=Path, help="arm: the arm's config file")
    parser.add_argument("--seed", type=int, default=0, help="arm: the training seed")
    parser.add_argument(
        "--epochs", nargs="+", default=["10", "20"], help="budgets (summary: also <E>r)"
    )
    args = parser.parse_args()
    if args.what == "run":
        budgets = [int(e) for e in args.epochs]
        run_fold(args.data, args.out, args.preset, args.folds, args.fold, budgets)
    elif args.what == "arm":
        if args.config is None:
            parser.error("arm needs --config")
        train_arm(args.data, args.out, args.folds, args.fold, args.name, args.config, args.seed)
    elif args.what == "readout":
        readout_arm(args.out, int(args.epochs[-1]), args.arm)
    else:
        json.dump(summary(args.out, args.epochs), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()
