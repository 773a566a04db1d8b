"""``evaluation.tta_flip`` (scores averaged with the left-right flip), ``evaluation.inferer``
and ``compare``'s handling of finished runs: scored again when only the evaluation
settings changed, refused when they were trained with other settings."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lymphdx.core.config import validate
from lymphdx.core.errors import LymphdxError
from lymphdx.engine.inferer import SlidingWindowInferer
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.workflows import detection as detection_module
from lymphdx.workflows.compare import compare
from lymphdx.workflows.compare_runs import reuse_finished
from lymphdx.workflows.evaluate import read_predictions
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def compared(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A compare folder of one multitask run (one epoch) scored without TTA; its tmp."""
    tmp = tmp_path_factory.mktemp("tta")
    config = tiny_config(tmp, training={"epochs": 1}, evaluation={"tta_flip": False})
    out = tmp / "cmp"
    compare(config, *_manifests(tiny_data), out, ["multitask"], [0], progress=False)
    return out, tmp


def _manifests(tiny_data: Path) -> tuple[Path, Path]:
    return tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"


def _by_hand(run: Path, tta: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """The run's test probabilities ``(N,)`` and strong-test ROI maps ``(D, H, W)``,
    computed here one scan at a time: σ of the model on the scan, and with ``tta`` the
    mean with σ of the model on the scan mirrored along x (the ROI map mirrored back)."""
    config, model, _ = load_model(run)
    data = load_run_data(config, run)
    weak, strong = data.volumes("weak", "test"), data.volumes("strong", "test", masks=True)

    def views(image: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        outs = [model(image, roi=True)]
        if tta:
            o = model(image.flip(-1), roi=True)
            outs.append({"cls": o["cls"], "roi": o["roi"].flip(-1)})
        return outs

    probs, maps = [], []
    with torch.no_grad():
        for i in range(len(weak)):
            outs = views(weak.batch([i]).images)
            probs.append(np.mean([torch.sigmoid(o["cls"]).item() for o in outs]))
        for i in range(len(strong)):
            outs = views(strong.batch([i]).images)
            maps.append(np.mean([torch.sigmoid(o["roi"])[0, 0].numpy() for o in outs], axis=0))
    return np.array(probs), maps


def test_compare_scores_a_finished_run_again_when_only_evaluation_changed(
    compared: tuple[Path, Path], tiny_data: Path
) -> None:
    out, tmp = compared
    run = out / "runs" / "multitask" / "seed0"
    weights, history = _sha(run / "checkpoints" / "best.pt"), _sha(run / "history.csv")
    before = read_predictions(run / "predictions_test.csv")
    ids = list(before)
    plain, _ = _by_hand(run, tta=False)
    np.testing.assert_allclose([before[i][1] for i in ids], plain, atol=2e-6)
    assert json.loads((run / "metrics.json").read_text())["tta_flip"] is False
    assert "strong training set: " in (run / "train.log").read_text()  # its nodes' size

    config = tiny_config(tmp, training={"epochs": 1}, evaluation={"tta_flip": True})
    results = compare(config, *_manifests(tiny_data), out, ["multitask"], [0], progress=False)

    # no weight changed: the same checkpoint and history, only the scores
    assert _sha(run / "checkpoints" / "best.pt") == weights
    assert _sha(run / "history.csv") == history
    assert "tta_flip: true" in (run / "config.yaml").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tta_flip"] is True
    after = read_predictions(run / "predictions_test.csv")
    flipped, maps = _by_hand(run, tta=True)
    np.testing.assert_allclose([after[i][1] for i in ids], flipped, atol=2e-6)
    assert not np.allclose(flipped, plain, atol=1e-4)  # the flip does change the scores
    assert results["strategies"]["multitask"]["test_auc"][0] == pytest.approx(metrics["auc"])
    assert json.loads((run / "detection.json").read_text())["tta_flip"] is True


def test_detection_scores_the_averaged_map(
    compared: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The maps that the detection metrics threshold are the flip-averaged ones, equal to
    the maps computed here scan by scan."""
    out, _ = compared
    run = out / "runs" / "multitask" / "seed0"
    assert "tta_flip: true" in (run / "config.yaml").read_text()  # the first test's rescoring
    seen: list[list[np.ndarray]] = []
    score = detection_module._score_split

    def spy(probs, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append([np.asarray(p) for p in probs])
        return score(probs, *args, **kwargs)

    monkeypatch.setattr(detection_module, "_score_split", spy)
    detection_module.evaluate_detection(run)
    _, flipped = _by_hand(run, tta=True)
    _, plain = _by_hand(run, tta=False)
    assert len(seen[0]) == len(flipped)
    for got, want, no_tta in zip(seen[0], flipped, plain, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert not np.allclose(got, no_tta, atol=1e-5)


def test_compare_refuses_a_finished_run_trained_otherwise(
    compared: tuple[Path, Path], tiny_data: Path
) -> None:
    out, tmp = compared
    run = out / "runs" / "multitask" / "seed0"
    metrics = (run / "metrics.json").read_bytes()
    config = tiny_config(tmp, training={"epochs": 1, "lr": 0.005})
    with pytest.raises(LymphdxError) as err:
        compare(config, *_manifests(tiny_data), out, ["multitask"], [0], progress=False)
    assert str(run) in str(err.value) and "training.lr" in str(err.value)
    assert (run / "metrics.json").read_bytes() == metrics  # nothing rewritten


def test_predict_averages_with_the_flip(compared: tuple[Path, Path], tiny_data: Path) -> None:
    """``predict`` with ``tta_flip`` gives the mean of its probability on the scan and on
    the scan mirrored left-right (written as a new file, with the geometry of the
    original), and says it did in ``prediction.json``."""
    import SimpleITK as sitk

    out, tmp = compared
    run = out / "runs" / "multitask" / "seed0"
    assert "tta_flip: true" in (run / "config.yaml").read_text()  # the first test's rescoring
    weak = sorted((tiny_data / "weak" / "images").glob("*.nii.gz"))[0]
    image = sitk.ReadImage(str(weak))
    mirrored = sitk.GetImageFromArray(sitk.GetArrayFromImage(image)[:, :, ::-1].copy())
    mirrored.CopyInformation(image)
    flipped_path = tmp / "mirrored.nii.gz"
    sitk.WriteImage(mirrored, str(flipped_path))

    (res,) = predict(run, [weak], tmp / "p_tta")
    assert res["tta_flip"] is True
    cfg_path = run / "config.yaml"
    text = cfg_path.read_text()
    try:
        cfg_path.write_text(text.replace("tta_flip: true", "tta_flip: false"))
        plain, mirror = predict(run, [weak, flipped_path], tmp / "p_plain")
    finally:
        cfg_path.write_text(text)
    assert plain["tta_flip"] is False
    # the network's probabilities are averaged (then calibrated, which is not linear)
    assert res["probability_uncalibrated"] == pytest.approx(
        (plain["probability_uncalibrated"] + mirror["probability_uncalibrated"]) / 2, abs=1e-3
    )


def test_a_run_is_scored_by_the_sliding_window_inferer(
    compared: tuple[Path, Path], tiny_data: Path
) -> None:
    """``evaluation.inferer: sliding_window`` scores a finished run again (no weight
    changes) and says so in ``metrics.json`` and ``detection.json``: with one tile the size
    of the volume (overlap 0, constant blending) its scores are the whole-volume ones
    computed here by hand; with smaller tiles they are the tiled inferer's, scan by scan."""
    out, tmp = compared
    run = out / "runs" / "multitask" / "seed0"
    weights = _sha(run / "checkpoints" / "best.pt")
    whole = {"tile": [32, 32, 16], "overlap": 0.0, "blending": "constant"}
    evaluation = {"tta_flip": True, "inferer": "sliding_window"}
    config = tiny_config(tmp, training={"epochs": 1}, evaluation=evaluation, inference=whole)
    compare(config, *_manifests(tiny_data), out, ["multitask"], [0], progress=False)
    assert _sha(run / "checkpoints" / "best.pt") == weights
    assert json.loads((run / "metrics.json").read_text())["inferer"] == "sliding_window"
    assert json.loads((run / "detection.json").read_text())["inferer"] == "sliding_window"
    scores = read_predictions(run / "predictions_test.csv")
    ids = list(scores)
    flipped, _ = _by_hand(run, tta=True)
    np.testing.assert_allclose([scores[i][1] for i in ids], flipped, atol=2e-6)

    tiles = {"tile": [16, 16, 16], "overlap": 0.5, "blending": "gaussian", "bag_tiles": 2}
    config = tiny_config(tmp, training={"epochs": 1}, evaluation=evaluation, inference=tiles)
    compare(config, *_manifests(tiny_data), out, ["multitask"], [0], progress=False)
    assert _sha(run / "checkpoints" / "best.pt") == weights
    scores = read_predictions(run / "predictions_test.csv")
    saved, model, _ = load_model(run)
    weak = load_run_data(saved, run).volumes("weak", "test")
    inferer = SlidingWindowInferer(saved.inference)
    by_hand = [
        float(inferer(model, weak.batch([i]).images, roi=False, flips=True)["cls"][0])
        for i in range(len(weak))
    ]
    assert weak.patient_ids == ids
    np.testing.assert_allclose([scores[i][1] for i in ids], by_hand, atol=2e-6)
    assert not np.allclose(by_hand, flipped, atol=1e-4)  # tiles of half the volume differ

    # predict scores a new scan through the same inferer (and the same scan preparation)
    record = weak.records[0]
    (result,) = predict(run, [record.image], tmp / "pred_tiles", progress=False)
    assert result["inferer"] == "sliding_window"
    assert result["classifier_probability"] == pytest.approx(by_hand[0], abs=2e-6)


def test_a_rescoring_stopped_part_way_is_scored_again(
    compared: tuple[Path, Path], tiny_data: Path, tmp_path: Path
) -> None:
    """A compare killed while it scored a run again leaves config.yaml with the new
    evaluation settings and metrics.json with the old ones: the next compare sees it
    (``metrics.json``'s ``scored_with``) and scores it again; then it is left alone."""
    out, _ = compared
    run = tmp_path / "run"
    shutil.copytree(out / "runs" / "multitask" / "seed0", run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    flip = not saved["evaluation"]["tta_flip"]
    saved["evaluation"]["tta_flip"] = flip  # what compare writes before it scores
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    config = validate(saved)  # what compare asks for (the run's settings, earlier tests')
    why = reuse_finished(config, run, *_manifests(tiny_data))
    assert why is not None and "evaluation.tta_flip" in why and "stopped part-way" in why
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tta_flip"] is flip and metrics["scored_with"]["evaluation"]["tta_flip"] is flip
    assert reuse_finished(config, run, *_manifests(tiny_data)) is None
    # a metrics.json that does not record a key (written before it existed) keeps its scores
    del metrics["scored_with"]["evaluation"]["tta_flip"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert reuse_finished(config, run, *_manifests(tiny_data)) is None
