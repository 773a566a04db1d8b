"""Intensity calibration: telling a scan in Hounsfield units from one in raw CT numbers.

``intensity_calibration`` summarises a scan's raw values (the air/background mode and the
body's fat/soft-tissue mode) and gives a verdict (``hu``, ``raw`` = HU + 1024, or
``unknown``); ``hu_offset`` is what is added to the scan before resampling. The set-level
check is ``lymphdx.data.preprocess.check_calibration``; why the window is fixed HU is set
out in ``lymphdx.data.preprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lymphdx.core.config import DataConfig

__all__ = [
    "Calibration",
    "RAW_CT_OFFSET",
    "hu_offset",
    "intensity_calibration",
]


#: Raw CT numbers are HU + this (the rescale intercept that some converters drop).
RAW_CT_OFFSET = 1024.0
_HIST_RANGE = (-1200.0, 1400.0)  # raw values summarised (padding and dense bone left out)
_HIST_BIN = 10.0
_AIR_HU = (-1200.0, -700.0)  # air / background (or lung) mode, in HU
_BODY_HU = (-200.0, 150.0)  # the body's mode: fat (about -100) or soft tissue (0 to 100)
_MIN_SEPARATION = 600.0  # air and body modes at least this far apart to count as two
_MIN_CLASS = 0.02  # share of the voxels each of the two clusters needs
_RAW_NEGATIVE = 0.01  # raw CT numbers: at most this share of the voxels in [-1150, -200)
_MIN_SPREAD = 20.0  # CT values spread over far more (air, fat, soft tissue, noise)
_SAMPLE = 4_000_000  # voxels summarised at most (an even stride through the scan)


@dataclass(frozen=True)
class Calibration:
    """A scan's intensity calibration as told by its raw values.

    ``air_mode``: the mode of the air/background cluster (None when the scan has no such
    cluster, e.g. a crop inside the body); ``body_mode``: the mode of the rest (fat or
    soft tissue); both in the file's own units. ``verdict``: ``hu`` (air near -1000 HU,
    body within -200..150 HU), ``raw`` (the same + 1024, and nothing below -200) or
    ``unknown``; so is a scan whose values spread over less than 20 between their 5th
    and 95th percentiles (normalised or rescaled values, a constant).
    """

    verdict: str
    air_mode: float | None
    body_mode: float | None
    spread: float | None = None  # 5th to 95th percentile of the summarised values

    @property
    def offset(self) -> float | None:
        """What maps the scan to HU: 0, -1024, or None when it cannot be told."""
        return {"hu": 0.0, "raw": -RAW_CT_OFFSET}.get(self.verdict)

    def describe(self) -> str:
        def shown(v: float | None) -> str:
            return "none" if v is None else f"{v:g}"

        text = (
            f"air/background mode {shown(self.air_mode)}, fat/soft-tissue mode "
            f"{shown(self.body_mode)}"
        )
        if self.spread is not None and self.spread < _MIN_SPREAD:
            text += f", values spread over only {self.spread:.3g}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "air_mode": self.air_mode,
            "body_mode": self.body_mode,
            "spread": self.spread,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        def number(v: Any) -> float | None:
            return None if v is None else float(v)

        return cls(
            str(data["verdict"]),
            number(data["air_mode"]),
            number(data["body_mode"]),
            number(data.get("spread")),
        )


def _otsu(hist: np.ndarray) -> int:
    """Index that splits ``hist`` into two classes of maximal between-class variance."""
    h = hist.astype(np.float64)
    index = np.arange(h.size, dtype=np.float64)
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * index)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between[:-1])) + 1


def intensity_calibration(array: np.ndarray) -> Calibration:
    """Tell a scan in HU from one in raw CT numbers (HU + 1024) by its histogram.

    Values in [-1200, 1400) (padding such as -2000 or -3024 and dense bone left out) are
    binned by 10 and split in two by Otsu's threshold; when the two clusters are each at
    least 2 % of the voxels and their modes at least 600 apart, the lower is the
    air/background mode and the upper the body's mode, else the scan has no air cluster
    and its overall mode is the body's. HU: body mode within -200..150 (fat to soft
    tissue) and air mode (if any) within -1200..-700; raw: both + 1024, and under 1 % of
    the voxels in [-1150, -200) (raw CT numbers are not negative). Anything else, and
    values that spread over less than 20 (5th to 95th percentile), is ``unknown``. A scan
    without air whose mode is near 0 reads as HU (soft tissue): a raw scan would be all
    air.
    """
    values = np.asarray(array).reshape(-1)
    values = values[:: max(1, values.size // _SAMPLE)]
    lo, hi = _HIST_RANGE
    inside = values[(values >= lo) & (values < hi)]  # NaN is neither
    if inside.size == 0:
        return Calibration("unknown", None, None, None)
    hist, edges = np.histogram(inside, bins=int((hi - lo) / _HIST_BIN), range=(lo, hi))
    centres = edges[:-1] + _HIST_BIN / 2
    smooth = np.convolve(hist, np.ones(5), mode="same")

    def mode(start: int, stop: int) -> float:
        peak = start + int(np.argmax(smooth[start:stop]))  # robust to noise...
        near = max(start, peak - 2)
        return float(centres[near + int(np.argmax(hist[near : min(stop, peak + 3)]))])  # ...exact

    split = _otsu(hist)
    air: float | None = None
    body = mode(0, hist.size)
    if min(hist[:split].sum(), hist[split:].sum()) >= _MIN_CLASS * inside.size:
        low, high = mode(0, split), mode(split, hist.size)
        if high - low >= _MIN_SEPARATION:
            air, body = low, high

    def fits(shift: float) -> bool:
        body_ok = _BODY_HU[0] + shift <= body <= _BODY_HU[1] + shift
        air_ok = air is None or _AIR_HU[0] + shift <= air <= _AIR_HU[1] + shift
        return body_ok and air_ok

    negative = np.count_nonzero((inside >= -1150.0) & (inside < -200.0)) / inside.size
    p5, p95 = np.percentile(inside, [5.0, 95.0])
    spread = float(p95 - p5)
    if spread < _MIN_SPREAD:
        verdict = "unknown"
    elif fits(0.0):
        verdict = "hu"
    elif fits(RAW_CT_OFFSET) and negative <= _RAW_NEGATIVE:
        verdict = "raw"
    else:
        verdict = "unknown"
    return Calibration(verdict, air, body, round(spread, 3))


def hu_offset(calibration: Calibration, cfg: DataConfig) -> float:
    """What is added to a scan's values: ``cfg.hu_offset`` when set, else -1024 for raw
    CT numbers and 0 otherwise (an ``unknown`` scan is refused by ``check_calibration``
    where a set is trained on, and warned about by ``predict``)."""
    if cfg.hu_offset is not None:
        return float(cfg.hu_offset)
    return calibration.offset or 0.0
