"""Which training passes move the batch norms' running statistics
(``training.running_stats``, ``lymphdx.engine.running_stats``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lymphdx.engine import running_stats
from lymphdx.engine.running_stats import frozen_running_stats, scan_pass_context
from lymphdx.engine.steps import StepModule
from lymphdx.engine.train import train
from lymphdx.models.multitask import build_model
from tests.conftest import tiny_config


def _stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_frozen_statistics_stay_while_the_batch_normalises_as_in_training() -> None:
    """Inside the context a train-mode batch norm gives the output of batch statistics
    (as outside) and leaves mean, variance and count as they were; outside it moves them."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(3).train()
    x = torch.randn(4, 3, 5, 6, 7) * 2 + 1
    free = copy.deepcopy(bn)
    expected = free(x)
    with frozen_running_stats(bn):
        out = bn(x)
    torch.testing.assert_close(out, expected)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(
        bn.running_var, torch.ones(3)
    )
    assert int(bn.num_batches_tracked) == 0
    bn(x)
    torch.testing.assert_close(bn.running_mean, free.running_mean)


def test_a_step_moves_the_statistics_of_the_passes_chosen(tmp_path: Path) -> None:
    """A step's running statistics equal those of a copy of the model that forwarded, in
    train mode, the scans then the patches (``all``) or the patches alone (``patches``);
    the step's outputs are the same either way (batch statistics in train mode)."""
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model = build_model(config.model).train()
    scans, patches = torch.randn(3, 1, 16, 32, 32), torch.randn(2, 1, 16, 16, 16)
    outs = {}
    for how in ("all", "patches"):
        stepped, reference = copy.deepcopy(model), copy.deepcopy(model)
        with torch.no_grad():
            if how == "all":
                reference(scans, roi=False)
            reference(patches, roi=True)
            step = StepModule(stepped, scan_pass_context(how, patch_pass=True))
            outs[how] = step(scans, False, patches)
        want, got = _stats(reference), _stats(stepped)
        assert want.keys() == got.keys() and len(got) > 10
        for k in want:
            torch.testing.assert_close(got[k], want[k], msg=f"{how}: {k}")
    assert outs["all"]["cls"].shape == (3,) and outs["all"]["roi_patch"].shape == (2, 1, 16, 16, 16)
    for k in outs["all"]:
        torch.testing.assert_close(outs["patches"][k], outs["all"][k])


def test_without_a_patch_pass_every_pass_moves_them() -> None:
    """A strategy without the ROI patches' pass moves the statistics on its scans' pass
    even under ``patches`` (else eval mode would keep those of initialisation)."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(2).train()
    with scan_pass_context("patches", patch_pass=False)(bn):
        bn(torch.randn(2, 2, 4, 4, 4) + 3)
    assert float(bn.running_mean.mean()) > 0.2


@contextlib.contextmanager
def _spied(calls: list[str]) -> Iterator[None]:
    """Records each use of ``running_stats: patches``'s context."""
    real = running_stats.RUNNING_STATS["patches"]

    @contextlib.contextmanager
    def spy(model: torch.nn.Module) -> Iterator[None]:
        calls.append(type(model).__name__)
        with real(model):
            yield

    running_stats.RUNNING_STATS["patches"] = spy
    try:
        yield
    finally:
        running_stats.RUNNING_STATS["patches"] = real


@pytest.mark.parametrize(("strategy", "used"), [("multitask", True), ("supervised", False)])
def test_training_runs_the_scans_pass_in_it(
    tmp_path: Path, tiny_data: Path, strategy: str, used: bool
) -> None:
    """A run with ``running_stats: patches`` and ROI patches runs every step's scans'
    pass in the context; a strategy without the patches' pass never does, and its
    statistics move."""
    config = tiny_config(
        tmp_path,
        strategy=strategy,
        training={"epochs": 1, "roi_patch": [16, 16, 16], "running_stats": "patches"},
    )
    calls: list[str] = []
    run = tmp_path / "run"
    with _spied(calls):
        train(
            config,
            run,
            tiny_data / "weak/manifest.csv",
            tiny_data / "strong/manifest.csv",
            progress=False,
        )
    assert (len(calls) > 0) == used and set(calls) <= {"MultiTaskNet"}
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert means and any(float(m.abs().sum()) > 0 for m in means)
