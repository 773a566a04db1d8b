"""Per-hospital batch-norm statistics re-estimated after training (``evaluation.bn_stats``,
``lymphdx.engine.domain_stats``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.inferers import sliding_window_inference

from lymphdx.core.domains import STRONG, WEAK
from lymphdx.core.errors import LymphdxError
from lymphdx.engine import run_data
from lymphdx.engine.domain_stats import (
    MAX_SCANS,
    apply_domain_stats,
    estimate_domain_stats,
    scan_tiles,
    stats_path,
)
from lymphdx.engine.run_folder import load_model
from lymphdx.models.domain_norm import DomainBatchNorm3d, domains
from lymphdx.models.multitask import build_model
from lymphdx.workflows.evaluate import evaluate_run, read_predictions
from tests.conftest import tiny_config
from tests.test_evaluation_settings import compared  # noqa: F401  (the fixture)


@pytest.mark.parametrize(
    ("shape", "tile", "overlap"),
    [
        ((20, 40, 37), (8, 16, 16), 0.25),
        ((16, 16, 16), (16, 16, 16), 0.5),
        ((9, 33, 50), (8, 16, 16), 0.0),
    ],
)
def test_tiles_are_monai_sliding_windows(
    shape: tuple[int, int, int], tile: tuple[int, int, int], overlap: float
) -> None:
    """The tiles are those MONAI's sliding window hands its predictor, read off a volume
    whose voxels hold their own index."""
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, 1, *shape)
    expected: list[torch.Tensor] = []

    def record(tiles: torch.Tensor) -> torch.Tensor:
        expected.extend(t[0] for t in tiles)
        return torch.zeros_like(tiles)

    sliding_window_inference(image, tile, 1, record, overlap=overlap, padding_mode="constant")
    got = [t[0, 0] for t in scan_tiles(image, tile, overlap)]
    assert len(got) == len(expected)
    assert sorted(float(t[0, 0, 0]) for t in got) == sorted(float(t[0, 0, 0]) for t in expected)
    assert all(t.shape == tile for t in got)


def test_a_scan_smaller_than_a_tile_is_padded_with_zero() -> None:
    image = torch.ones(1, 1, 4, 8, 8)
    (only,) = list(scan_tiles(image, (8, 8, 8), 0.25))
    assert only.shape == (1, 1, 8, 8, 8)
    assert float(only.sum()) == 4 * 8 * 8 and float(only[0, 0, :2].abs().sum()) == 0


class _Volumes:
    """A stand-in for ``VolumeSet``: ``len`` and ``image(i)``."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        return self.images[i]


class _Data:
    def __init__(self, weak: list[np.ndarray], strong: list[np.ndarray]) -> None:
        self.sets = {"weak": _Volumes(weak), "strong": _Volumes(strong)}

    def volumes(self, domain: str, split: str) -> _Volumes:
        return self.sets[domain] if split == "train" else _Volumes([])


def test_each_hospital_gets_the_statistics_of_its_own_tiles(tmp_path: Path) -> None:
    """The stem's batch norm of each domain holds the mean over that hospital's tile
    batches of the per-batch channel mean and variance of the stem's convolution, computed
    here by hand; γ and β stay the trained ones; eval outputs differ by domain."""
    config = tiny_config(
        tmp_path,
        evaluation={"inferer": "sliding_window", "bn_stats": "per_hospital"},
        inference={"tile": [16, 16, 16], "overlap": 0.5, "tile_batch": 3},
    )
    torch.manual_seed(0)
    model = build_model(config.model).eval()
    rng = np.random.default_rng(0)
    weak = [rng.normal(0, 1, (20, 24, 36)).astype(np.float32) for _ in range(2)]
    strong = [rng.normal(2, 3, (16, 20, 40)).astype(np.float32) for _ in range(3)]
    conv, bn = model.encoder.stem[0], model.encoder.stem[1]
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()

    def by_hand(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        means, variances = [], []
        tiles = [
            t
            for im in images
            for t in scan_tiles(torch.from_numpy(im)[None, None], (16, 16, 16), 0.5)
        ]
        cuts = [3 * i for i in range(len(tiles) // 3)] + [len(tiles)]
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            assert 3 <= b - a <= 5  # batches of 3, the remainder joined to the last
            with torch.no_grad():
                y = conv(torch.cat(tiles[a:b]))
            means.append(y.mean(dim=(0, 2, 3, 4)))
            variances.append(y.var(dim=(0, 2, 3, 4), unbiased=True))
        return torch.stack(means).mean(0), torch.stack(variances).mean(0)

    expected = {WEAK: by_hand(weak), STRONG: by_hand(strong)}
    estimate_domain_stats(model, config, _Data(weak, strong))  # type: ignore[arg-type]
    stem = model.encoder.stem[1]
    assert isinstance(stem, DomainBatchNorm3d) and stem.shared_affine
    for domain, (mean, var) in expected.items():
        torch.testing.assert_close(stem.bns[domain].running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stem.bns[domain].running_var, var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stem.weight.detach(), gamma)
    torch.testing.assert_close(stem.bias.detach(), beta)
    assert not model.training
    x = torch.from_numpy(weak[0][None, None, :16, :16, :16])
    with torch.no_grad(), domains(model, WEAK):
        a = model(x, roi=True)["roi"]
    with torch.no_grad(), domains(model, STRONG):
        b = model(x, roi=True)["roi"]
    assert not torch.allclose(a, b)


def test_at_most_max_scans_per_hospital_are_read(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, evaluation={"bn_stats": "per_hospital"})
    model = build_model(config.model)
    read: list[int] = []

    class Counting(_Volumes):
        def image(self, i: int) -> np.ndarray:
            read.append(i)
            return super().image(i)

    n = MAX_SCANS + 7
    data = _Data([], [np.zeros((16, 32, 32), np.float32)])
    data.sets["weak"] = Counting([np.zeros((16, 32, 32), np.float32)] * n)
    estimate_domain_stats(model, config, data)  # type: ignore[arg-type]
    assert len(read) == MAX_SCANS and read[0] == 0 and read[-1] == n - 1


def test_a_hospital_without_training_scans_is_refused(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, evaluation={"bn_stats": "per_hospital"})
    model = build_model(config.model)
    data = _Data([np.zeros((16, 32, 32), np.float32)], [])
    with pytest.raises(LymphdxError, match="strong set has none"):
        estimate_domain_stats(model, config, data)  # type: ignore[arg-type]
    assert not any(isinstance(m, DomainBatchNorm3d) for m in model.modules())


def test_a_run_scored_with_each_hospitals_statistics(
    compared: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``evaluate`` of a copy of a finished run with ``bn_stats: per_hospital`` estimates
    and keeps the statistics; a later load reads them back without the data, and scores
    change while the weights do not; ``trained`` leaves the model as it was."""
    out, _ = compared
    run = tmp_path / "run"
    shutil.copytree(out / "runs" / "multitask" / "seed0", run)
    before = read_predictions(run / "predictions_test.csv")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"]["bn_stats"] = "per_hospital"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    evaluate_run(run, "test")
    assert stats_path(run).exists()
    after = read_predictions(run / "predictions_test.csv")
    assert after.keys() == before.keys()
    assert not np.allclose([after[k][1] for k in after], [before[k][1] for k in after])
    _, model, _ = load_model(run)
    stored = torch.load(stats_path(run), weights_only=True)["state"]
    state = model.state_dict()
    assert stored and all(torch.equal(state[k], v) for k, v in stored.items())

    # the stored statistics are read back: the data is not read
    def unreadable(*args: object, **kwargs: object) -> None:
        raise LymphdxError("the manifest cannot be read")

    monkeypatch.setattr(run_data, "load_run_data", unreadable)
    _, again, _ = load_model(run)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in stored.items())
    # without them and without the data: a clear error
    stats_path(run).unlink()
    with pytest.raises(LymphdxError, match="cannot be read.*bn_stats: trained"):
        load_model(run)
    config["evaluation"]["bn_stats"] = "trained"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _, plain, _ = load_model(run)
    assert not any(isinstance(m, DomainBatchNorm3d) for m in plain.modules())


def test_a_model_trained_with_domain_norms_is_refused(tmp_path: Path) -> None:
    config = tiny_config(
        tmp_path, model={"norm": "domain_batch"}, evaluation={"bn_stats": "per_hospital"}
    )
    model = build_model(config.model)
    with pytest.raises(LymphdxError, match="domain_batch"):
        apply_domain_stats(tmp_path, config, model)
