"""Issue 8's options wired into training, and the ``ssmdmt-plus`` strategy.

Graph label propagation, the EMA teacher, the curriculum, the pseudo-mask ignore band and
classifier gate, domain-specific batch norm, the model selection options and the
strategy's defaults: each option's mechanics, on tiny data.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from lymphdx.core.config import PAPER_STRATEGIES, Config, dump_config, load_config, validate
from lymphdx.core.config import STRATEGIES as CONFIG_STRATEGIES
from lymphdx.core.errors import ConfigError
from lymphdx.core.strategies import STRATEGIES, STRATEGY_DEFAULTS
from lymphdx.engine import propagation
from lymphdx.engine import steps as steps_module
from lymphdx.engine import trainer as trainer_module
from lymphdx.engine.losses import RoiLoss
from lymphdx.engine.pseudo_masks import curriculum_keep
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_checkpoint
from lymphdx.engine.train import train
from lymphdx.engine.trainer import Trainer
from lymphdx.models.domain_norm import DomainBatchNorm3d
from lymphdx.models.multitask import build_model
from lymphdx.workflows import predict as inference
from lymphdx.workflows import run_scorer
from lymphdx.workflows.compare import _for_strategy
from lymphdx.workflows.evaluate import evaluate_run
from tests.helpers import ALL_OPTIONS, cache, one_thread  # noqa: F401  (fixtures)
from tests.helpers import history as _history
from tests.helpers import manifests as _manifests
from tests.helpers import run_config as _config

OFF = {
    "propagation": {
        "method": "model",
        "teacher": "student",
        "tta_flip": False,
        "curriculum": False,
        "roi_ignore_low": None,
        "roi_cls_gate": None,
    },
    "training": {"selection": "best_val", "keep_epochs": False},
    "model": {"norm": "batch"},
}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ckpt(run: Path, name: str) -> dict[str, Any]:
    return load_checkpoint(run / "checkpoints" / f"{name}.pt")


# -- config ----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["quick", "paper"])
@pytest.mark.parametrize("strategy", PAPER_STRATEGIES)
def test_options_are_off_in_the_presets_and_paper_strategies(preset: str, strategy: str) -> None:
    config = load_config(preset=preset, overrides={"strategy": strategy})
    for section, values in OFF.items():
        for key, value in values.items():
            if (preset, key) == ("quick", "selection"):  # the quick recipe: a fixed budget
                value = "ema_last"
            assert getattr(getattr(config, section), key) == value, (section, key)


def test_strategy_lists_agree() -> None:
    assert tuple(STRATEGIES) == CONFIG_STRATEGIES
    assert CONFIG_STRATEGIES[:4] == PAPER_STRATEGIES
    for name, sections in STRATEGY_DEFAULTS.items():  # every default is a valid config value
        assert name in STRATEGIES
        validate({"strategy": name, **sections})


def test_strategy_defaults_fill_only_the_keys_left_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the mechanism, with every option as ssmdmt-plus's defaults (what the ablation
    # adopts for it may be fewer, or none)
    monkeypatch.setitem(STRATEGY_DEFAULTS, "ssmdmt-plus", ALL_OPTIONS)
    # no preset: the presets set some of these keys (quick: selection), and theirs win
    plus = validate({"strategy": "ssmdmt-plus", "propagation": {"curriculum": False}})
    for section, values in ALL_OPTIONS.items():
        for key, value in values.items():
            expected = False if key == "curriculum" else value  # the user's value wins
            assert getattr(getattr(plus, section), key) == expected, key
    # config.yaml (dump_config) holds the resolved values and reloads to the same config
    again = validate(yaml.safe_load(dump_config(plus)))
    assert again == plus and again.propagation.method == "graph"
    # compare re-validates with another strategy: that strategy's defaults, not plus's
    other = validate({**_for_strategy(plus), "strategy": "ssmdmt"})
    assert other.propagation.method == "model" and other.training.selection == "best_val"
    assert other.propagation.curriculum is False  # set by the user: kept
    back = validate({**_for_strategy(other), "strategy": "ssmdmt-plus"})
    assert back == plus


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"propagation": {"roi_ignore_low": 0.9}}, "roi_ignore_low"),
        ({"propagation": {"roi_cls_gate": 1.5}}, "roi_cls_gate"),
        ({"propagation": {"graph_alpha": 1.0}}, "graph_alpha"),
        ({"propagation": {"graph_k": 0}}, "graph_k"),
        ({"propagation": {"curriculum_start": -0.1}}, "curriculum_start"),
        ({"propagation": {"method": "knn"}}, "method"),
        ({"propagation": {"teacher": "swa"}}, "teacher"),
        ({"training": {"ema_decay": 1.0}}, "ema_decay"),
        ({"training": {"selection": "best"}}, "selection"),
        ({"training": {"swa_epochs": 0}}, "swa_epochs"),
        ({"model": {"norm": "domain"}}, "norm"),
        ({"propagation": {"roi_ignore_lo": 0.2}}, "roi_ignore_lo"),
        ({"propagation": {"roi_threshold": 0.1, "roi_ignore_low": 0.2}}, "roi_ignore_low"),
    ],
)
def test_bad_option_values_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=overrides)


# -- propagation mechanics ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run_data(tiny_data: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    weak, strong = _manifests(tiny_data)
    config = _config(cache, manifests={"weak": str(weak), "strong": str(strong)})
    return config, load_run_data(config, tmp_path_factory.mktemp("plus_data"))


def test_ignore_band_and_classifier_gate_set_the_mask_weights(run_data: Any) -> None:
    config, data = run_data
    volumes = data.volumes("weak", "train")
    torch.manual_seed(0)
    model = build_model(config.model)
    head, fc2 = model.decoder.head[-1], model.classifier.fc2

    def targets(p_roi: float, cls_bias: float, **cfg: Any) -> tuple[np.ndarray, Any]:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.fill_(math.log(p_roi / (1 - p_roi)))
            fc2.weight.zero_()
            fc2.bias.fill_(cls_bias)
        p = config.propagation.model_copy(update=cfg)
        return propagation.propagate_mask_targets(model, volumes, p)

    masks, weights = targets(0.5, 20.0)
    assert weights is None and masks.max() == 0  # the paper: no weights, every voxel counts
    band = {"roi_ignore_low": 0.2}
    masks, weights = targets(0.5, 20.0, **band)  # 0.2 <= 0.5 <= ζ: ignored
    assert weights.dtype == np.uint8 and weights.shape == masks.shape and weights.max() == 0
    masks, weights = targets(0.85, 20.0, **band)  # above ζ: a node, counted
    assert masks.min() == 1 and weights.min() == 1
    masks, weights = targets(0.1, 20.0, **band)  # below the band: background, counted
    assert masks.max() == 0 and weights.min() == 1
    gate = {"roi_cls_gate": 0.5}
    _, weights = targets(0.85, 20.0, **gate)  # the classifier says positive: kept
    assert weights.min() == 1
    _, weights = targets(0.85, -20.0, **gate)  # negative: the whole scan is left out
    assert weights.max() == 0


def test_curriculum_admits_a_growing_most_confident_share(run_data: Any) -> None:
    config, data = run_data
    volumes = data.volumes("strong", "train")
    torch.manual_seed(1)
    model = build_model(config.model)
    cfg = config.propagation.model_copy(update={"curriculum": True})
    p = propagation.predict_volumes(model, volumes)
    n, kept = len(volumes), []
    for round_index in range(5):
        _, weights = propagation.pseudo_labels(p, cfg, round_index=round_index)
        kept.append(int((weights > 0).sum()))
        share = min(1.0, 0.2 + 0.2 * round_index)
        assert kept[-1] == math.ceil(share * n)
        # the kept ones are the most confident
        confidence = np.abs(2 * p - 1)
        assert confidence[weights > 0].min() >= confidence[weights == 0].max(initial=0)
    assert kept == sorted(kept) and kept[-1] == n
    schedule = config.propagation.model_copy(update={"warmup_epochs": 3, "every": 2})
    assert [propagation.propagation_round(e, schedule) for e in (3, 5, 7)] == [0, 1, 2]


# -- every option at once, end to end -----------------------------------------------------

PLUS_EPOCHS = 3


def _plus_config(cache: Path, epochs: int) -> Config:
    return _config(
        cache,
        strategy="ssmdmt",
        # a tiny model's first labels may be one class: keep their loss (the paper's way)
        propagation={**ALL_OPTIONS["propagation"], "skip_one_class": False},
        training={**ALL_OPTIONS["training"], "epochs": epochs, "keep_epochs": True},
    )


@pytest.fixture(scope="module")
def plus_run(tiny_data: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An ssmdmt run with every option on (``ALL_OPTIONS``), 3 epochs (propagation at 1
    and 2), with its calls recorded."""
    run = tmp_path_factory.mktemp("plus") / "run"
    seen: dict[str, list] = {"trainer": [], "graph": [], "masks": [], "lp": [], "masked": []}
    real_graph = propagation.propagate_labels_graph
    real_masks = propagation.propagate_mask_targets
    real_lp = propagation.pseudo_labels_for
    real_roi_loss = RoiLoss.forward

    class SpyTrainer(Trainer):
        def propagation(self) -> None:
            seen["trainer"].append(self)
            super().propagation()
            seen["masks"][-1]["stored"] = self.pseudo.weak_mask_weights

    def graph_spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_graph(model, *args, **kwargs)
        seen["graph"].append({"model": model, "out": out, "round": kwargs["round_index"]})
        return out

    def masks_spy(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen["masks"].append({"model": model})
        return real_masks(model, *args, **kwargs)

    def lp_spy(result: Any, index: Any, soft: bool = True) -> Any:
        seen["lp"].append((result, index, soft))
        return real_lp(result, index, soft)

    def masked_spy(self: Any, logits: Any, targets: Any, weights: Any = None, **kw: Any) -> Any:
        if weights is not None:  # the pseudo masks' voxel weights
            seen["masked"].append(weights.detach().cpu().numpy().copy())
        return real_roi_loss(self, logits, targets, weights, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(propagation, "propagate_labels_graph", graph_spy)
        mp.setattr(propagation, "propagate_mask_targets", masks_spy)
        mp.setattr(propagation, "pseudo_labels_for", lp_spy)
        mp.setattr(RoiLoss, "forward", masked_spy)
        config = _plus_config(cache, PLUS_EPOCHS)
        train(config, run, *_manifests(tiny_data), progress=False, trainer=SpyTrainer)
    return run, seen


def test_all_options_run_records_its_resolved_options(plus_run: Any) -> None:
    run, _ = plus_run
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["strategy"] == "ssmdmt"
    for section, values in ALL_OPTIONS.items():
        for key, value in values.items():
            assert saved[section][key] == value, key
    history = _history(run)
    assert [int(r["propagated"]) for r in history] == [0, 1, 1]
    for row in history[1:]:
        assert row["loss_pseudo_cls"] != "" and row["loss_pseudo_roi"] != ""
    # the curriculum admits a growing share each round (ceil(0.2 N), then ceil(0.4 N))
    n = len(plus_run[1]["graph"][0]["out"][1])
    kept = [float(r["pseudo_kept_fraction"]) for r in history[1:]]
    assert kept == [math.ceil(0.2 * n) / n, math.ceil(0.4 * n) / n]


def test_the_ema_teacher_makes_the_pseudo_labels(plus_run: Any) -> None:
    _, seen = plus_run
    assert len(seen["trainer"]) == 2
    for trainer, graph, masks in zip(seen["trainer"], seen["graph"], seen["masks"], strict=True):
        assert trainer.ema is not None
        assert graph["model"] is trainer.ema.module and masks["model"] is trainer.ema.module
        assert graph["model"] is not trainer.model


def test_graph_propagation_weights_are_relative_certainty_times_class_weight(plus_run: Any) -> None:
    _, seen = plus_run
    assert [g["round"] for g in seen["graph"]] == [0, 1]
    for (result, index, soft), graph in zip(seen["lp"], seen["graph"], strict=True):
        assert soft  # ALL_OPTIONS: soft pseudo-labels
        targets, weights = graph["out"]
        np.testing.assert_allclose(targets, result.probs[index, 1], rtol=1e-6)
        certainty = result.certainty[index] / result.certainty.max()  # as Iscen et al.'s code
        expected = certainty * result.class_weights[result.pseudo[index]]
        keep = curriculum_keep(result.certainty[index], graph["round"], 0.2, 0.2)
        np.testing.assert_allclose(weights, np.where(keep, expected, 0.0), rtol=1e-5, atol=0)


def test_the_pseudo_mask_loss_gets_the_stored_voxel_weights(plus_run: Any) -> None:
    _, seen = plus_run
    stored = seen["masks"][-1]["stored"]
    assert stored is not None and stored.dtype == np.uint8
    assert seen["masked"], "the ROI loss never got voxel weights"
    flat = {w.tobytes() for w in stored} | {
        np.ascontiguousarray(w[..., ::-1]).tobytes() for w in stored
    }
    for weights in seen["masked"][-3:]:  # the last epoch's steps: that round's weights
        assert set(np.unique(weights)) <= {0.0, 1.0}
        for item in weights[:, 0]:
            assert item.astype(np.uint8).tobytes() in flat


def test_selection_ema_puts_the_ema_weights_in_best(plus_run: Any) -> None:
    run, _ = plus_run
    last, best = _ckpt(run, "last"), _ckpt(run, "best")
    assert best["selection"] == "ema" and last["ema"] is not None
    final = _ckpt(run, f"epoch_{PLUS_EPOCHS - 1:03d}")  # keep_epochs: the validated weights
    assert _same_weights(final["model"], last["ema"]["model"])
    assert not _same_weights(final["model"], last["model"])  # not the student
    chosen = _ckpt(run, f"epoch_{best['best']['epoch']:03d}")
    assert _same_weights(best["model"], chosen["model"])
    with open(run / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["epoch"]) for r in rows}) == list(range(PLUS_EPOCHS))


def test_resumed_all_options_run_equals_the_uninterrupted_run(
    plus_run: Any, tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    reference, _ = plus_run
    run = tmp_path / "resumed"
    weak, strong = _manifests(tiny_data)
    train(_plus_config(cache, 2), run, weak, strong, progress=False)
    train(_plus_config(cache, PLUS_EPOCHS), run, weak, strong, resume=True, progress=False)
    assert _history(run) == _history(reference)
    assert (run / "val_predictions.csv").read_text() == (
        reference / "val_predictions.csv"
    ).read_text()
    a, b = _ckpt(run, "last"), _ckpt(reference, "last")
    assert _same_weights(a["model"], b["model"])
    assert _same_weights(a["ema"]["model"], b["ema"]["model"])
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert _same_weights(_ckpt(run, "best")["model"], _ckpt(reference, "best")["model"])


# -- domain-specific batch norm ----------------------------------------------------------


def test_domain_batch_norm_routes_weak_to_0_and_strong_to_1(
    tiny_data: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, Any]] = []

    def recorder(module: Any) -> Any:
        real = module.domains

        def spy(model: Any, ids: Any) -> Any:
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
            calls.append((type(model).__name__, ids))
            return real(model, ids if isinstance(ids, int) else torch.tensor(ids))

        monkeypatch.setattr(module, "domains", spy)

    recorder(trainer_module)  # strong-validation Dice
    recorder(steps_module)  # the training steps
    recorder(propagation)
    config = _config(cache, model={"norm": "domain_batch"})
    run = tmp_path / "run"
    train(config, run, *_manifests(tiny_data), progress=False)

    steps = [
        (k, c) for k, c in enumerate(calls) if c[0] == "MultiTaskNet" and isinstance(c[1], list)
    ]
    assert steps
    for k, (_, ids) in steps:
        n_strong = config.training.strong_batch_size
        assert ids == [0] * (len(ids) - n_strong) + [1] * n_strong  # weak first, then strong
        after = calls[k + 1] if k + 1 < len(calls) else None
        if after is not None and after[0] == "RoiDecoder":  # roi = the strong scans only
            assert after[1] == [1] * n_strong
    assert any(c == ("RoiDecoder", [1] * 2) for c in calls)  # epoch 0: real masks only
    # propagation and validation route by set: strong 1, weak 0 (both seen)
    assert {c[1] for c in calls if isinstance(c[1], int)} == {0, 1}

    state = _ckpt(run, "last")["model"]
    torch.manual_seed(config.seed)
    initial = build_model(config.model).state_dict()
    for domain in (0, 1):  # both domains' statistics were trained
        key = f"encoder.stem.1.bns.{domain}.running_mean"
        assert not torch.equal(state[key], initial[key]), key
    model = build_model(config.model)
    assert any(isinstance(m, DomainBatchNorm3d) for m in model.modules())
    model.load_state_dict(state)  # evaluate/predict rebuild the same structure

    # predict --domain strong: the strong hospital's normalisation and batch statistics
    calls.clear()
    recorder(run_scorer)  # predict scores through RunScorer
    image = tiny_data / "strong" / "images" / "S0001.nii.gz"
    (result,) = inference.predict(run, [image], tmp_path / "pred", domain="strong")
    assert calls == [("MultiTaskNet", 1)] and 0.0 <= result["probability"] <= 1.0


# -- model selection --------------------------------------------------------------------


@pytest.mark.parametrize("strategy, domains", [("supervised", [0]), ("multitask", [0, 1])])
def test_swa_batch_norm_statistics_come_from_every_set_the_strategy_trains_on(
    strategy: str, domains: list[int], tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    """SWA's recomputed batch-norm statistics: the weak training scans, and the strong
    training scans too when the strategy trains on them (training's statistics saw both)."""
    from lymphdx.engine.trainer import Trainer

    seen: list[tuple[int, int]] = []

    class Recording(Trainer):
        def swa_bn_sets(self):  # type: ignore[no-untyped-def]
            sets = super().swa_bn_sets()
            seen.extend((domain, len(volumes)) for volumes, domain in sets)
            return sets

    config = _config(
        cache,
        strategy=strategy,
        training={"epochs": 2, "roi_warmup_epochs": 0, "selection": "swa", "swa_epochs": 2},
    )
    train(config, tmp_path / "run", *_manifests(tiny_data), progress=False, trainer=Recording)
    splits = list(csv.DictReader(open(tmp_path / "run" / "splits.csv")))
    n_weak = sum(r["split"] == "train" and r["set"] == "weak" for r in splits)
    n_strong = sum(r["split"] == "train" and r["set"] == "strong" for r in splits)
    assert [d for d, _ in seen] == domains
    assert seen == [(0, n_weak), (1, n_strong)][: len(domains)]


@pytest.mark.parametrize("selection", ["best_val", "last", "swa", "ema"])
def test_selection_puts_the_chosen_weights_in_best(
    selection: str, tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    epochs = 1 if selection == "ema" else 3
    config = _config(
        cache,
        strategy="supervised",
        training={"epochs": epochs, "selection": selection, "swa_epochs": 2, "keep_epochs": True},
    )
    run = tmp_path / "run"
    train(config, run, *_manifests(tiny_data), progress=False)
    best, last = _ckpt(run, "best"), _ckpt(run, "last")
    assert best["selection"] == selection
    if selection == "last":
        assert best["best"]["epoch"] == epochs - 1
        assert _same_weights(best["model"], last["model"])
    elif selection == "ema":
        assert _same_weights(best["model"], last["ema"]["model"])
        assert not _same_weights(best["model"], last["model"])
    elif selection == "swa":
        kept = [_ckpt(run, f"epoch_{e:03d}")["model"] for e in (1, 2)]  # the averaged epochs
        for key, value in best["model"].items():
            if key.endswith(("weight", "bias")):
                torch.testing.assert_close(value, (kept[0][key] + kept[1][key]) / 2)
        mean = "encoder.stem.1.running_mean"  # batch-norm statistics recomputed
        assert not torch.equal(best["model"][mean], kept[1][mean])
    else:
        chosen = _ckpt(run, f"epoch_{best['best']['epoch']:03d}")
        assert _same_weights(best["model"], chosen["model"])
    metrics = evaluate_run(run)
    assert metrics["selection"] == selection
    assert json.loads((run / "metrics.json").read_text())["selection"] == selection
    if selection == "swa":
        assert metrics["swa_epochs"] == [1, 2]
