"""Did a run's ROI decoder learn? Read from its ``history.csv`` rows.

A run whose decoder ends with no strong-validation Dice found no node: its scan-level AUC
then measures a classifier without the ROI task, not the strategy, and ``train.log``,
``metrics.json`` and ``compare``'s ``results.md`` say so.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# below this strong-validation Dice at the end, the decoder is taken to find no node
# (one small node found among dozens of scans gives ~0.05)
ROI_LEARNED_DICE = 0.05


def roi_decoder_status(history: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"learned", "final_strong_val_dice", "best_strong_val_dice", "note"}`` from the
    history rows' ``strong_val_dice`` (``note`` is ``None`` when it learned); ``None``
    when no row has one (no ROI task, or no strong validation patient)."""
    dices = []
    for row in history:
        value = row.get("strong_val_dice")
        if value not in (None, ""):
            dices.append(float(value))
    if not dices:
        return None
    final, best = dices[-1], max(dices)
    learned = final >= ROI_LEARNED_DICE
    note = None
    if not learned:
        what = "never learned" if best < ROI_LEARNED_DICE else "lost what it had learned"
        note = (
            f"the ROI decoder {what}: strong-validation Dice {final:.3f} at the end (best "
            f"{best:.3f}; < {ROI_LEARNED_DICE} means it finds no node), so this run's AUC "
            "is not the strategy's"
        )
    return {
        "learned": learned,
        "final_strong_val_dice": final,
        "best_strong_val_dice": best,
        "note": note,
    }
