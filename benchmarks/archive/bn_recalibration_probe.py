"""Is a run's strong-validation Dice held down by its batch-norm statistics?

In the joint phase the decoder's batch norms see weak whole scans beside strong patches.
For each of a run's checkpoints (``best`` and ``last``) this prints the strong-validation
Dice at ζ as trained, and again after the batch-norm running statistics are re-estimated
on the strong training scans alone (a cumulative average over one pass, no weight
changes). A large rise would point at the statistics; the dev log
(docs/dev-log-2026-11-25_to_2026-12-03.md) section 7.2 (third round) found ≤ 0.04,
i.e. the features themselves had changed.
Usage: python benchmarks/archive/bn_recalibration_probe.py RUN [RUN ...]
(set LYMPHDX_CACHE to the cache the run was trained with)
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from lymphdx.core.domains import STRONG
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import MultiTaskNet


def dice(model: MultiTaskNet, volumes, threshold: float) -> float:  # type: ignore[no-untyped-def]
    """Dice of the ROI mask (σ(logit) > threshold) over all of ``volumes`` together."""
    inter = total = 0.0
    with torch.no_grad(), domains(model, STRONG):
        for start in range(0, len(volumes), 4):
            batch = volumes.batch(list(range(start, min(start + 4, len(volumes)))))
            pred = torch.sigmoid(model(batch.images)["roi"]) > threshold
            target = batch.masks > 0
            inter += float((pred & target).sum())
            total += float(pred.sum() + target.sum())
    return 2 * inter / max(total, 1.0)


def recalibrated(model: MultiTaskNet, volumes) -> MultiTaskNet:  # type: ignore[no-untyped-def]
    """A copy of ``model`` whose batch-norm statistics are those of ``volumes``."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad(), domains(model, STRONG):
        for start in range(0, len(volumes), 4):
            model(volumes.batch(list(range(start, min(start + 4, len(volumes))))).images)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run in args.runs:
        for which in ("best", "last"):
            config, model, _ = load_model(run, which)
            data = load_run_data(config, run)
            val = data.volumes("strong", "val", masks=True)
            train = data.volumes("strong", "train", masks=True)
            zeta = config.propagation.roi_threshold
            print(
                f"{run} {which}: strong-val Dice at {zeta} {dice(model, val, zeta):.3f}, "
                f"after re-estimating BN on strong train "
                f"{dice(recalibrated(model, train), val, zeta):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
