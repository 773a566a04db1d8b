"""Issue 29: how well a run's decoder finds the weak hospital's nodes on patients it did
not train on (synthetic data only: the phantom's true masks of the weak set).

The default data's fold 2 fails on the decoder's false regions on the weak hospital's
scans (BENCHMARKS.md §4.6), while the development folds' rules read the decoder's Dice on
the *strong* hospital. This scores a run's weak ``test`` split (for a development fold's
run: the fold's held-out development patients) against ``DATA/weak_truth/masks`` as
``evaluate``'s detection scores the strong test split (``evaluation.inferer``, the flip,
the ROI map at ζ for Dice, candidates at 0.1 for FROC), and adds the candidates per scan.

    OMP_NUM_THREADS=1 python benchmarks/issue29_weak_truth.py RUN DATA [RUN ...]

One JSON line per run. Reads the runs and the data, writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lymphdx.core.domains import WEAK
from lymphdx.engine.inferer import make_inferer
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.workflows.detection import _roi_probabilities, _score_split, weak_truth_masks


def weak_truth_scores(run: Path, data: Path, candidate_threshold: float = 0.1) -> dict:
    """Dice, FROC and candidates per scan of ``run``'s weak test split against the
    phantom's true masks in ``data/weak_truth/masks``."""
    config, model, state = load_model(run)
    run_data = load_run_data(config, run)
    weak = run_data.volumes("weak", "test")
    idx, truths = weak_truth_masks(run_data, weak, data / "weak_truth" / "masks")
    probs = _roi_probabilities(
        model, weak, idx, WEAK, config.evaluation.tta_flip, make_inferer(config)
    )
    scores = _score_split(probs, truths, candidate_threshold, config.propagation.roi_threshold)
    return {
        "run": str(run),
        "checkpoint_epoch": int(state["best"]["epoch"]),
        "n_scans": scores["n_volumes"],
        "n_nodes": scores["n_nodes"],
        "dice": scores["dice"],
        "froc": scores["froc"]["mean_sensitivity"],
        "candidates_per_scan": scores["n_candidates"] / max(1, scores["n_volumes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path, help="the lymphdx synth folder (weak_truth/)")
    parser.add_argument("more", type=Path, nargs="*", help="further runs")
    args = parser.parse_args()
    for run in [args.run, *args.more]:
        print(json.dumps(weak_truth_scores(run, args.data)), flush=True)


if __name__ == "__main__":
    main()
