"""Shared fixtures: a tiny synthetic two-hospital data set and a tiny config."""

from __future__ import annotations

from pathlib import Path

import pytest

from lymphdx.core.config import Config, load_config
from lymphdx.data.synthetic import SynthSpec, write_synthetic


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 weak scans (14 positive) and 12 strong scans; returns the data folder."""
    out = tmp_path_factory.mktemp("synth")
    write_synthetic(out, SynthSpec(n_weak=30, n_pos=14, n_strong=12, seed=3))
    return out


def tiny_config(tmp_path: Path, **overrides: object) -> Config:
    """A very small network on 32×32×16 volumes, 2 epochs, propagation from epoch 1."""
    base: dict = {
        "data": {
            "spacing": [7.5, 7.5, 12.0],
            "shape": [32, 32, 16],
            "cache_dir": str(tmp_path / "cache"),
        },
        "model": {
            "init_features": 8,
            "growth_rate": 4,
            "block_layers": [1, 1, 1, 1],
            "classifier_hidden": 8,
            "pool": "avgmax",
            "roi_evidence": "off",
            "malignancy_map": False,
            "classifier_dropout": None,
        },
        # the paper's schedule (one pass over the weak set per epoch, no ROI warm-up, no
        # Dice gate, flips only): tests of the quick preset's step schedule, patches,
        # augmentation and attention set those keys themselves
        "training": {
            "epochs": 2,
            # the tiny data's nodes are small on this grid: no doubled budget in tests
            "small_node_epochs": None,
            "batch_size": 4,
            "strong_batch_size": 2,
            "steps_per_epoch": None,
            "roi_warmup_epochs": 0,
            "roi_patch": None,
            "pseudo_cls_batch_size": None,
            "selection": "best_val",
            "augmentation": {"enabled": False},
        },
        "propagation": {"warmup_epochs": 1, "every": 1, "dice_gate": None},
        "evaluation": {"bootstrap": 200},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return load_config(overrides=base)
