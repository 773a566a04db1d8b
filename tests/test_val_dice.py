"""The strong-validation Dice that the gates read (history.csv) is the detection report's
Dice of the same weights on the same patients, without the flip (issue 29 item 6: the
investigation of why validation read 1/6 of the test figure found the computation exact;
this pins it, so that a change to one path and not the other shows)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lymphdx.core.domains import STRONG
from lymphdx.engine.run_data import load_run_data
from lymphdx.engine.run_folder import load_checkpoint, load_model, load_run_config
from lymphdx.engine.train import train
from lymphdx.models.domain_norm import domains
from lymphdx.models.multitask import build_model
from lymphdx.workflows.detection import _roi_probabilities, _score_split
from tests.helpers import cache, one_thread  # noqa: F401  (fixtures)
from tests.helpers import history as _history
from tests.helpers import manifests as _manifests
from tests.helpers import run_config as _config

ZETA = 0.0125  # the 2-epoch decoder is near its prior (~0.01): marks some voxels, not all


def test_history_dice_is_detections_pooled_dice_without_the_flip(
    tiny_data: Path, cache: Path, tmp_path: Path
) -> None:
    config = _config(
        cache,
        strategy="multitask",
        data={"split": {"weak": [90, 10, 23], "strong": [6, 3, 3]}},
        model={"pool": "attention"},
        training={"selection": "ema_last", "keep_epochs": True},
        propagation={"roi_threshold": ZETA},
    )
    run = tmp_path / "run"
    weak, strong = _manifests(tiny_data)
    train(config, run, weak, strong, progress=False)
    last = _history(run)[-1]
    logged = float(last["strong_val_dice"])

    # the validated weights of the last epoch, by hand: one scan per forward pass, eval
    # mode, σ > ζ, Dice pooled over the validation scans (2 Σ|P∩T| / Σ(|P| + |T|))
    kept = load_checkpoint(run / "checkpoints" / f"epoch_{int(last['epoch']):03d}.pt")
    model = build_model(config.model)
    model.load_state_dict(kept["model"])
    model.eval()
    data = load_run_data(load_run_config(run), run)
    val = data.volumes("strong", "val", masks=True)
    assert len(val) == 3
    inter = total = predicted = 0
    with torch.no_grad(), domains(model, STRONG):
        for i in range(len(val)):
            image = torch.from_numpy(val.image(i)[None, None].copy())
            prob = torch.sigmoid(model(image)["roi"])[0, 0].numpy()
            pred = prob > ZETA
            truth = val.mask(i) > 0
            inter += int((pred & truth).sum())
            total += int(pred.sum() + truth.sum())
            predicted += int(pred.sum())
    assert 0 < predicted < 3 * val.mask(0).size  # neither nothing nor everything marked
    assert 0 < inter
    np.testing.assert_allclose(logged, 2 * inter / total, rtol=1e-6)

    # evaluate's detection path on best.pt (ema_last: the same weights), flip off
    _, best, _ = load_model(run)
    idx = list(range(len(val)))
    probs = _roi_probabilities(best, val, idx, STRONG, tta=False)
    scored = _score_split(probs, [val.mask(i) for i in idx], 0.1, ZETA)
    np.testing.assert_allclose(scored["dice"], logged, rtol=1e-6)
