"""Which of a run's switches fired, and on how many patients (``results.md``'s "Switches
per run"): the parts of the method that a measured figure turns on or off.

- propagation's Dice gate (``propagation.dice_gate``): the epoch propagation started and
  the Dice it read, on how many strong scans (``history.csv``'s ``propagation_note``,
  ``gate_dice``, ``gate_scans``), or why it never started;
- the ROI decoder's status at the end (``roi_status.json``: Dice on all strong training +
  validation scans), which decides whether its map is read;
- the ROI readout (``evaluation.roi_readout``; ``metrics.json``): applied, and fitted on
  how many weak patients, or why not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lymphdx.core.files import read_csv
from lymphdx.core.strategies import get_strategy
from lymphdx.engine.roi_status import read_roi_status

__all__ = ["run_switches"]


def _propagation(rows: list[dict[str, str]], strategy: str) -> str:
    if not get_strategy(strategy).propagates:
        return "—"
    started = [r for r in rows if r.get("propagated") == "1"]
    if started:
        first = started[0]
        note = (first.get("propagation_note") or "").split(";")[0]
        if note.startswith("started at epoch"):  # no gate: the note says it all
            return note
        why = note.removeprefix("started: ")
        return f"started at epoch {first['epoch']}" + (f" ({why})" if why else "")
    last = next((r for r in reversed(rows) if r.get("propagation_note")), None)
    return "never" + (f" ({last['propagation_note'].split(';')[0]})" if last else "")


def run_switches(run_dir: Path, strategy: str) -> dict[str, str]:
    """One run's switches as short phrases: ``propagation``, ``decoder``, ``readout``."""
    run_dir = Path(run_dir)
    history = run_dir / "history.csv"
    rows = read_csv(history) if history.exists() else []
    status = read_roi_status(run_dir)
    if status is None:
        decoder = "—"
    else:
        where = f"{status['n_scans']} " if status.get("n_scans") else ""
        found = "found nodes" if status["learned"] else "found no node"
        decoder = f"{found}: Dice {status['dice']:.3f} on {where}{status['read_on']}"
    readout = "—"
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        metrics: dict[str, Any] = json.loads(metrics_path.read_text())
        r = metrics.get("roi_readout") or {}
        if r.get("applied"):
            readout = f"applied (fitted on {r.get('n_train', '?')} weak patients)"
        elif r.get("note"):
            readout = str(r["note"])
    return {
        "run": run_dir.name if run_dir.parent.name == strategy else str(run_dir),
        "propagation": _propagation(rows, strategy),
        "decoder": decoder,
        "readout": readout,
    }
