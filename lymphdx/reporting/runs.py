"""A run folder as the reports see it: the ``Run`` record (filled by
``lymphdx.workflows.report_inputs``) and the orderings and value parsing that the report
and the learning curves share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lymphdx.core.config import STRATEGIES

__all__ = ["Run", "natural_key", "strategy_order", "float_or_nan"]


@dataclass
class Run:
    """One run folder as the report reads it (raw YAML config, nothing validated)."""

    path: Path
    name: str  # display name within its strategy, e.g. "seed0" or "repeat0/fold1/seed0"
    config: dict[str, Any]
    strategy: str
    seed: int
    metrics: dict[str, Any] | None
    detection: dict[str, Any] | None
    history: list[dict[str, str]]
    predictions: dict[str, tuple[int, float]] | None


def natural_key(text: str) -> list[Any]:
    """Sort key that orders the digits in ``text`` as numbers (``seed2`` < ``seed10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def strategy_order(names: Sequence[str], preferred: Sequence[str] = ()) -> list[str]:
    """The distinct ``names``: ``preferred`` first, then in ``STRATEGIES``' order, then
    any other name alphabetically."""
    order = list(preferred) + [s for s in STRATEGIES if s not in preferred]
    return sorted(set(names), key=lambda s: (order.index(s) if s in order else len(order), s))


def float_or_nan(text: str | None) -> float:
    """A CSV cell as a float; NaN for an empty, missing or malformed cell."""
    try:
        return float(text) if text not in (None, "") else float("nan")
    except ValueError:
        return float("nan")
