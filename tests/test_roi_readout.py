"""``evaluation.roi_readout``: the ROI map's readings, the regression fitted on them (against
scikit-learn's own pipeline), and the probability that evaluate, compare and predict
write (against the classifier and the readout computed here, scan by scan)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lymphdx.core.errors import LymphdxError
from lymphdx.engine import node_readout
from lymphdx.engine import roi_readout as readout_module
from lymphdx.engine import run_data as run_data_module
from lymphdx.engine.node_readings import node_table
from lymphdx.engine.node_readout import fit_node_readout
from lymphdx.engine.roi_readout import (
    FEATURES,
    READOUT_C,
    RoiReadout,
    fit_readout,
    readout_features,
    run_readout,
)
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_model
from lymphdx.workflows.compare import compare
from lymphdx.workflows.evaluate import evaluate_run, read_predictions
from lymphdx.workflows.export import export
from lymphdx.workflows.predict import predict
from tests.conftest import tiny_config


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def test_features_by_hand() -> None:
    """Each reading against a per-scan NumPy sort: the logit of the mean of the k largest
    probabilities, of the largest, log(1 + sum), then the image under the k most probable
    voxels: its probability-weighted mean and sd and its 10th percentile."""
    rng = np.random.default_rng(0)
    maps = rng.uniform(0.001, 0.999, size=(3, 1, 4, 6, 5)).astype(np.float32)
    images = rng.normal(size=(3, 1, 4, 6, 5)).astype(np.float32)
    got = readout_features(torch.from_numpy(maps), torch.from_numpy(images))
    assert got.shape == (3, len(FEATURES)) == (3, 13)
    for b in range(3):
        order = np.argsort(maps[b].ravel())[::-1]
        ranked = maps[b].ravel()[order].astype(np.float64)
        under = images[b].ravel()[order].astype(np.float64)
        want = [_logit(ranked[:k].mean()) for k in (5, 10, 20, 40, 80)]
        want += [_logit(ranked[0]), np.log1p(ranked.sum())]
        for k in (20, 80):
            w, x = ranked[:k], under[:k]
            m = np.average(x, weights=w)
            want += [m, np.sqrt(np.average((x - m) ** 2, weights=w)), np.percentile(x, 10)]
        np.testing.assert_allclose(got[b], want, rtol=1e-5)


def test_image_readings_worked_example() -> None:
    """A map of 24 voxels whose 20 most probable (p = 0.9) lie on image value 2 except
    two on 0 (a node straddling fat), the other four (p = 0.1) on 5: over the top 20 the
    weighted mean is 1.8, the sd sqrt(0.36) = 0.6 (18 voxels 0.2 above the mean, two 1.8
    below: (18 * 0.04 + 2 * 3.24) / 20 = 0.36), the 10th percentile of [0, 0, 2 x 18] at
    position 1.9 is 0.9 * 2 = 1.8; over all 24 (k = 80 is capped) the weights are 18 x
    0.9 on 2, 2 x 0.9 on 0 and 4 x 0.1 on 5: mean (32.4 + 2) / 18.4."""
    p = torch.full((24,), 0.9)
    p[20:] = 0.1
    x = torch.full((24,), 2.0)
    x[[3, 11]] = 0.0
    x[20:] = 5.0
    got = readout_features(p.reshape(1, 1, 2, 3, 4), x.reshape(1, 1, 2, 3, 4))[0]
    at = {name: got[i] for i, name in enumerate(FEATURES)}
    assert at["image_top20_wmean"] == pytest.approx(1.8, abs=1e-5)
    assert at["image_top20_wsd"] == pytest.approx(0.6, abs=1e-5)
    assert at["image_top20_p10"] == pytest.approx(1.8, abs=1e-5)
    assert at["image_top80_wmean"] == pytest.approx(34.4 / 18.4, abs=1e-5)
    with pytest.raises(ValueError, match="differ"):
        readout_features(p.reshape(1, 1, 2, 3, 4), x[:12].reshape(1, 1, 1, 3, 4))


def test_features_of_a_map_smaller_than_k() -> None:
    """A map of 12 voxels: every k above 12 reads the mean of all of them."""
    maps = torch.linspace(0.05, 0.6, 12).reshape(1, 1, 2, 2, 3)
    got = readout_features(maps, torch.zeros_like(maps))[0]
    everything = _logit(float(maps.double().mean()))
    assert got[FEATURES.index("roi_top20_mean")] == pytest.approx(everything)
    assert got[FEATURES.index("roi_top80_mean")] == pytest.approx(everything)
    assert got[FEATURES.index("roi_top5_mean")] == pytest.approx(
        _logit(float(maps.flatten().sort().values[-5:].double().mean()))
    )


def test_fit_matches_scikit_learn() -> None:
    """The stored standardisation + regression gives scikit-learn's pipeline's
    probabilities; ``combine`` is the mean with the classifier's; the JSON form reads
    back to the same readout."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(25)].astype(int)
    features = rng.normal(size=(55, len(FEATURES))) + labels[:, None] * np.linspace(
        0, 1, len(FEATURES)
    )
    readout = fit_readout(features, labels)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=READOUT_C)).fit(features, labels)
    test = rng.normal(size=(9, len(FEATURES)))
    np.testing.assert_allclose(readout.probability(test), pipe.predict_proba(test)[:, 1], atol=1e-5)
    classifier = rng.uniform(size=9)
    np.testing.assert_allclose(
        readout.combine(classifier, test),
        (classifier + pipe.predict_proba(test)[:, 1]) / 2,
        atol=1e-5,
    )
    assert (readout.n_train, readout.n_pos) == (55, 25)
    back = RoiReadout.from_json(json.loads(json.dumps(readout.to_json())))
    np.testing.assert_allclose(back.probability(test), readout.probability(test))
    with pytest.raises(ValueError, match="features"):
        RoiReadout.from_json({**readout.to_json(), "features": ["roi_max"]})


def test_fit_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="one class"):
        fit_readout(np.zeros((5, len(FEATURES))), np.ones(5))


@pytest.fixture(scope="module")
def compared(
    tiny_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, pytest.MonkeyPatch]:
    """A compare folder of one multitask and one supervised run (one epoch) with the
    readout on. The tiny decoder finds no node in one epoch, and a decoder that found none
    gets no readout, so the decoder is taken to have learned here (the test below checks
    the other case)."""
    tmp = tmp_path_factory.mktemp("readout")
    mp = pytest.MonkeyPatch()
    mp.setattr(readout_module, "read_roi_status", lambda run: {"learned": True, "note": None})
    config = tiny_config(tmp, training={"epochs": 1}, evaluation={"roi_readout": True})
    weak, strong = tiny_data / "weak" / "manifest.csv", tiny_data / "strong" / "manifest.csv"
    compare(config, weak, strong, tmp / "cmp", ["multitask", "supervised"], [0], progress=False)
    yield tmp / "cmp", tmp, mp
    mp.undo()


def _by_hand(run: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, classifier probabilities and readings (the map's, then the image's under its
    most probable voxels) of the run's weak ``split``, one scan at a time, averaged here
    with the scan mirrored along x when the run's ``evaluation.tta_flip`` says so (the ROI
    map mirrored back)."""
    config, model, _ = load_model(run)
    volumes = load_run_data(config, run, need_strong=False).volumes("weak", split)
    probs, feats = [], []
    with torch.no_grad():
        for i in range(len(volumes)):
            image = volumes.batch([i]).images
            outs = [model(image, roi=True)]
            if config.evaluation.tta_flip:
                o = model(image.flip(-1), roi=True)
                outs.append({"cls": o["cls"], "roi": o["roi"].flip(-1)})
            probs.append(np.mean([torch.sigmoid(o["cls"]).item() for o in outs]))
            roi = np.mean([torch.sigmoid(o["roi"]).double().numpy().ravel() for o in outs], 0)
            order = np.argsort(roi)[::-1]
            ranked, under = roi[order], image.double().numpy().ravel()[order]
            row = [_logit(ranked[:k].mean()) for k in (5, 10, 20, 40, 80)]
            row += [_logit(ranked[0]), np.log1p(roi.sum())]
            for k in (20, 80):
                m = np.average(under[:k], weights=ranked[:k])
                row += [m, np.sqrt(np.average((under[:k] - m) ** 2, weights=ranked[:k]))]
                row.append(np.percentile(under[:k], 10))
            feats.append(row)
    return volumes.labels, np.array(probs), np.array(feats)


def test_evaluate_averages_the_classifier_and_the_readout(
    compared: tuple[Path, Path, pytest.MonkeyPatch],
) -> None:
    out, _, _ = compared
    run = out / "runs" / "multitask" / "seed0"
    assert load_model(run)[0].evaluation.tta_flip  # the quick preset's, so flipped here too
    y_tr, _, f_tr = _by_hand(run, "train")
    y_va, _, f_va = _by_hand(run, "val")
    y_te, cls_te, f_te = _by_hand(run, "test")
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=READOUT_C))
    pipe.fit(np.r_[f_tr, f_va], np.r_[y_tr, y_va])
    want = (cls_te + pipe.predict_proba(f_te)[:, 1]) / 2
    got = read_predictions(run / "predictions_test.csv")
    ids = (
        load_run_data(*load_model(run)[:1], run, need_strong=False)
        .volumes("weak", "test")
        .patient_ids
    )
    # evaluate scores 4 scans a batch, this test one: float32 sums differ in the last
    # bits, and on a one-epoch map of nearly equal probabilities the k most probable
    # voxels (hence the image readings) can differ by a voxel, moving the readout by
    # ~1e-4 with 2 threads; a readout left out or misread moves it by ~1e-2
    np.testing.assert_allclose([got[i][1] for i in ids], want, atol=1e-3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["roi_readout"]["applied"] is True
    assert metrics["roi_readout"]["n_train"] == len(y_tr) + len(y_va)
    stored = json.loads((run / "roi_readout.json").read_text())
    assert stored["features"] == list(FEATURES) and stored["weight"] == 0.5
    # fitted at the end of training, so that the run folder carries it
    assert "ROI readout: fitted on" in (run / "train.log").read_text()


def test_supervised_has_no_readout(compared: tuple[Path, Path, pytest.MonkeyPatch]) -> None:
    out, _, _ = compared
    run = out / "runs" / "supervised" / "seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["roi_readout"]["applied"] is False
    assert "does not train the ROI decoder" in metrics["roi_readout"]["note"]
    assert not (run / "roi_readout.json").exists()
    _, cls, _ = _by_hand(run, "test")
    got = read_predictions(run / "predictions_test.csv")
    np.testing.assert_allclose(sorted(p for _, p in got.values()), sorted(cls), atol=2e-6)


def test_a_decoder_that_found_nothing_gets_no_readout(
    compared: tuple[Path, Path, pytest.MonkeyPatch],
) -> None:
    out, _, mp = compared
    run = out / "runs" / "multitask" / "seed0"
    config, model, _ = load_model(run)
    mp.setattr(
        readout_module,
        "read_roi_status",
        lambda run: {"learned": False, "note": "x", "dice": 0.0, "read_on": "x"},
    )
    try:
        readout, note = run_readout(run, config, model)
    finally:
        mp.setattr(readout_module, "read_roi_status", lambda run: {"learned": True, "note": None})
    assert readout is None and "found no node" in note


def test_predict_uses_the_stored_readout(
    compared: tuple[Path, Path, pytest.MonkeyPatch], tiny_data: Path
) -> None:
    """``predict`` on a weak test scan gives evaluate's probability for that patient, from
    ``roi_readout.json`` (not fitted again: the run's manifests may be gone by then), and
    records the classifier's own probability beside it."""
    out, tmp, _ = compared
    run = out / "runs" / "multitask" / "seed0"
    stored = (run / "roi_readout.json").read_bytes()
    patient = sorted(read_predictions(run / "predictions_test.csv"))[0]
    image = tiny_data / "weak" / "images" / f"{patient}.nii.gz"
    assert image.exists()
    config, model, _ = load_model(run)
    readout, _ = run_readout(run, config, model)
    assert readout is not None

    def no_refit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stored readout should have been used")

    mp = pytest.MonkeyPatch()
    mp.setattr(run_data_module, "load_run_data", no_refit)
    try:
        (res,) = predict(run, [image], tmp / "pred")
    finally:
        mp.undo()
    want = read_predictions(run / "predictions_test.csv")[patient][1]
    assert res["probability"] == pytest.approx(want, abs=1e-4)
    assert res["probability"] != pytest.approx(res["classifier_probability"], abs=1e-6)
    assert "averaged with the classifier" in res["roi_readout"]
    assert (run / "roi_readout.json").read_bytes() == stored


def test_compare_reports_each_half(compared: tuple[Path, Path, pytest.MonkeyPatch]) -> None:
    """``results.json`` and ``results.md`` say which strategies were scored with the
    readout, with the classifier's and the readout's test AUC alone (metrics.json's)."""
    out, _, _ = compared
    results = json.loads((out / "results.json").read_text())["strategies"]
    metrics = json.loads((out / "runs" / "multitask" / "seed0" / "metrics.json").read_text())
    ro = results["multitask"]["roi_readout"]
    assert (ro["runs"], ro["of_runs"]) == (1, 1)
    assert ro["auc_classifier_mean"] == pytest.approx(metrics["roi_readout"]["auc_classifier"])
    assert ro["auc_readout_mean"] == pytest.approx(metrics["roi_readout"]["auc_readout"])
    assert "roi_readout" not in results["supervised"]
    text = (out / "results.md").read_text()
    assert "evaluation.roi_readout; 1 of 1 runs" in text
    assert f"readout {ro['auc_readout_mean']:.3f}" in text


def test_predict_without_a_readout_or_its_data_says_what_to_do(
    compared: tuple[Path, Path, pytest.MonkeyPatch], tiny_data: Path
) -> None:
    out, tmp, _ = compared
    run = out / "runs" / "multitask" / "seed0"
    path = run / "roi_readout.json"
    stored = path.read_bytes()
    image = sorted((tiny_data / "weak" / "images").glob("*.nii.gz"))[0]

    def gone(*args: object, **kwargs: object) -> None:
        raise LymphdxError("the weak manifest /data/weak.csv does not exist")

    mp = pytest.MonkeyPatch()
    mp.setattr(run_data_module, "load_run_data", gone)
    path.unlink()
    try:
        with pytest.raises(LymphdxError) as err:
            predict(run, [image], tmp / "pred_gone")
    finally:
        mp.undo()
        path.write_bytes(stored)
    text = str(err.value)
    assert str(run) in text and "/data/weak.csv" in text and "lymphdx evaluate" in text
    assert not (tmp / "pred_gone").exists()  # refused before any output


def test_the_node_readout_is_fitted_stored_and_averaged(
    compared: tuple[Path, Path, pytest.MonkeyPatch],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A copy of the multitask run set to ``evaluation.readout: nodes`` (a setting read
    after training): evaluate fits the node readout on the weak train + val patients
    (``fit_node_readout`` on the node tables of maps computed here, four scans a batch as
    evaluate does) and writes the mean of the classifier and the readout; the stored
    readout says its kind, and the map's readout is not read for it."""
    out, _, _ = compared
    run = tmp_path / "run"
    shutil.copytree(out / "runs" / "multitask" / "seed0", run)
    (run / "roi_readout.json").unlink()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["evaluation"]["readout"] = "nodes"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    config, model, _ = load_model(run)
    assert config.evaluation.readout == "nodes"
    mm = tuple(float(v) for v in config.data.spacing[::-1])
    data = load_run_data(config, run, need_strong=False)

    def maps(split: str) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        volumes = data.volumes("weak", split)
        cls, rois, images = [], [], []
        with torch.no_grad():
            for start in range(0, len(volumes), 4):
                image = volumes.batch(range(start, min(start + 4, len(volumes)))).images
                a, b = model(image, roi=True), model(image.flip(-1), roi=True)
                cls += ((torch.sigmoid(a["cls"]) + torch.sigmoid(b["cls"])) / 2).tolist()
                roi = (torch.sigmoid(a["roi"]) + torch.sigmoid(b["roi"]).flip(-1)) / 2
                rois += [r[0].numpy() for r in roi]
                images += [x[0].numpy() for x in image]
        return np.array(cls), rois, images

    by_split = {split: maps(split) for split in ("train", "val", "test")}
    # the one-epoch map stays under 0.5: outline its regions at a value between two of its
    # probabilities far apart (between its 97th and 99th percentiles), so that no voxel
    # lies near it
    values = np.unique(np.concatenate([r.ravel() for r in by_split["train"][1]]))
    top = values[int(0.97 * len(values)) : int(0.99 * len(values))]
    gap = int(np.argmax(np.diff(top)))
    threshold = float((top[gap] + top[gap + 1]) / 2)
    monkeypatch.setattr(node_readout, "THRESHOLD", threshold)

    def tables(split: str) -> list[np.ndarray]:
        _, rois, images = by_split[split]
        return [node_table(r, x, mm, threshold) for r, x in zip(rois, images, strict=True)]

    train, val = tables("train"), tables("val")
    labels = np.r_[data.volumes("weak", "train").labels, data.volumes("weak", "val").labels]
    assert sum(len(t) for t in train + val) > 0
    evaluate_run(run, detection=False)
    stored = json.loads((run / "roi_readout.json").read_text())
    assert stored["kind"] == "nodes" and stored["voxel_mm"] == list(mm)
    metrics = json.loads((run / "metrics.json").read_text())["roi_readout"]
    assert metrics["applied"] and "nodes (MIL)" in metrics["note"]
    want_readout = fit_node_readout(train + val, labels, mm)
    np.testing.assert_allclose(stored["coef"], want_readout.coef, rtol=1e-6, atol=1e-9)
    want = want_readout.combine(by_split["test"][0], tables("test"))
    got = read_predictions(run / "predictions_test.csv")
    ids = data.volumes("weak", "test").patient_ids
    np.testing.assert_allclose([got[i][1] for i in ids], want, atol=1e-5)
    # predict reads a scan's nodes with the stored readout, as evaluate did
    image = Path(data.volumes("weak", "test").records[0].image)
    (res,) = predict(run, [image], tmp_path / "pred")
    assert res["probability_uncalibrated"] == pytest.approx(want[0], abs=1e-5)
    with pytest.raises(LymphdxError, match="evaluation.readout: nodes.*lymphdx predict"):
        export(run, tmp_path / "exported", "torchscript")
    assert not (tmp_path / "exported").exists()
    # evaluation.readout_weight 1: the readout alone, from the same stored fit
    saved["evaluation"]["readout_weight"] = 1.0
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    evaluate_run(run, detection=False)
    got = read_predictions(run / "predictions_test.csv")
    alone = want_readout.probability(tables("test"))
    np.testing.assert_allclose([got[i][1] for i in ids], alone, atol=1e-5)
    assert json.loads((run / "roi_readout.json").read_text())["coef"] == stored["coef"]
    note = json.loads((run / "metrics.json").read_text())["roi_readout"]["note"]
    assert note.endswith("in place of the classifier")
