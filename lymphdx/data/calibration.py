"""Intensity calibration: which linear map takes a scan's stored values to Hounsfield units.

The fixed ``hu_window`` is only right for HU, but files hold other linear maps of them:
raw CT numbers (HU + 1024, the rescale intercept dropped by a converter), raw CT numbers
cut to fewer bits (``(HU + 1024) / 8`` as uint8 is an 8-bit export), tenths of HU.
``intensity_calibration`` tells the map ``HU = scale * value + offset`` from the scan
itself; ``calibrate`` applies it (or the one ``data.hu_scale`` / ``data.hu_offset``
give): the one function through which training's cache and ``predict`` take a scan to
HU. ``check_calibration`` reports a set's corrected scans and refuses the unclear ones.

The rule. A CT scan has anchors whose HU are physical constants: air (-1000), fat (about
-100) and soft tissue (muscle and organs 40-60). The histogram gives the air/background
mode and the body's mode, but the body's mode is fat in one scan and soft tissue in the
next: the two pin the scale only to within about 15 % (1000 vs 1150 HU from air to body)
and the offset to about 100 HU, too loose to correct a scan by (a 10 % gain error moves a
node across the fat/soft-tissue contrast the model reads). So the modes do not
*estimate* a map, they *choose* one among the exact maps that storage produces
(``STORAGE_MAPS``), and only when exactly one of them puts air, fat and the body where
they lie:

1. HU and raw CT numbers are read as before (unchanged verdicts for every scan that was
   told before): the file's values in [-1200, 1400) (padding such as -2000 or -3024 and
   dense bone left out) are binned by 10 and split by Otsu's threshold; two clusters of
   >= 2 % each with modes >= 600 apart are air and body, else the scan has no air cluster
   and its overall mode is the body's. ``hu``: body mode within -200..150 and air (if any)
   within -1200..-700; ``raw``: both + 1024 and under 1 % of the values in [-1150, -200)
   (raw CT numbers are not negative). A scan read as HU *with* an air cluster, or as raw,
   is final.
2. Otherwise (HU without an air cluster, or neither) each map of ``STORAGE_MAPS`` and
   ``UNTOLD_MAPS`` is tried: the values are mapped by it and read as in 1, and the map
   fits when the reading has an air cluster (-1200..-700) and a body mode within
   -200..150; when the fat lies where fat does (fewer than half as many values in
   -700..-250 HU, between air and fat, as in fat's -200..-50: a soft-tissue window's
   8-bit export read as (HU + 1024) / 8 puts its fat near -720); and, for raw CT numbers
   scaled, when under 0.5 % of the values are negative (stored CT numbers start at 0; the
   minimum, which may be padding, left out). Verdict ``scaled``, corrected by the map,
   when exactly one map fits, it is one of ``STORAGE_MAPS`` and its air lies at -1000 +-
   50 HU (outside air: the scale hangs on it). Any other fit (two maps, a map of
   ``UNTOLD_MAPS``, air elsewhere) makes the scan ``unknown`` (``note`` names the maps):
   then more than one reading is possible, HU without air among them.
3. No map fits and 1 read HU without air: the scan is HU (a crop inside the body, its
   mode fat or soft tissue), unless what was read as its body is not tissue: >= 2 % of
   the values sit at their minimum and that minimum is above -700 (values clipped at the
   bottom of a window, e.g. an 8-bit export of a soft-tissue window), or >= 20 % of the
   values at -1200 or above lie at 1400 or above (HU has little beyond dense bone: the
   body lies above the range read). These, and anything else, are ``unknown``; so are
   values that spread over less than 20 (5th to 95th percentile: normalised or z-scored
   values, a constant), which no map of ``STORAGE_MAPS`` can fit.

Which maps are corrected is a trade against false corrections of HU scans: a map's air
must fall where HU has no tissue. ``(HU + 1024) / 4 .. / 16`` put their air at stored 0-6,
where a HU crop holds water at most (and its noise then goes negative); ``HU * 10`` puts
it at -10000. ``(HU + 1024) / 2`` and ``* 2`` (a rescale slope of 0.5 dropped;
``UNTOLD_MAPS``) put their air where HU soft tissue lies and their body where bone does:
a crop of muscle and spine could be either, so a scan that fits them is ``unknown``, not
corrected. Values normalised to [0, 1] or z-scored, a window's 8-bit export and other
slopes are ``unknown`` too: refused where a set is trained on (``check_calibration``),
warned about by ``predict``; ``data.hu_scale`` and ``data.hu_offset`` then give the map
when the user knows it (nothing is checked). Limits: a scaled scan cropped inside the
body (no air) has one mode, which cannot tell a scale: it reads as HU or unknown; and
raw CT numbers divided by a factor in neither list (e.g. 2.5) may read as HU without air
when air fills most of the scan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError

__all__ = [
    "Calibration",
    "CalibrationSource",
    "RAW_CT_OFFSET",
    "STORAGE_MAPS",
    "UNTOLD_MAPS",
    "calibrate",
    "check_calibration",
    "describe_map",
    "describe_storage",
    "hu_map",
    "intensity_calibration",
    "storage_maps_text",
]


#: Raw CT numbers are HU + this (the rescale intercept that some converters drop).
RAW_CT_OFFSET = 1024.0
#: The scaled storages told apart, ``(scale, offset)`` of ``HU = scale * value + offset``:
#: raw CT numbers cut to 10, 9 or 8 bits ((HU + 1024) / 4, / 8, / 16; e.g. an 8-bit
#: export) and tenths of HU. Powers of two apart, so that the modes tell them apart.
STORAGE_MAPS: tuple[tuple[float, float], ...] = (
    (4.0, -RAW_CT_OFFSET),
    (8.0, -RAW_CT_OFFSET),
    (16.0, -RAW_CT_OFFSET),
    (0.1, 0.0),
)
#: Maps that are never corrected, but that make a scan they fit ``unknown``: ``(HU +
#: 1024) / 2`` and ``* 2`` (a rescale slope of 0.5 dropped) put their air where HU soft
#: tissue lies and their body where bone does, so a HU crop of muscle and spine fits them.
UNTOLD_MAPS: tuple[tuple[float, float], ...] = ((2.0, -RAW_CT_OFFSET), (0.5, -RAW_CT_OFFSET))
_HIST_RANGE = (-1200.0, 1400.0)  # values summarised (padding and dense bone left out)
_HIST_BIN = 10.0
_AIR_HU = (-1200.0, -700.0)  # air / background (or lung) mode, in HU
_SCALED_AIR_HU = (-1050.0, -950.0)  # the same for a scaled map: outside air only
_BODY_HU = (-200.0, 150.0)  # the body's mode: fat (about -100) or soft tissue (0 to 100)
_MIN_SEPARATION = 600.0  # air and body modes at least this far apart to count as two
_MIN_CLASS = 0.02  # share of the voxels each of the two clusters needs
_RAW_NEGATIVE = 0.01  # raw CT numbers: at most this share of the voxels in [-1150, -200)
_SCALED_NEGATIVE = 0.005  # raw CT numbers cut to fewer bits: at most this share below 0
_MIN_SPREAD = 20.0  # CT values spread over far more (air, fat, soft tissue, noise)
_FAT_HU = (-200.0, -50.0)  # fat
_GAP_HU = (-700.0, -250.0)  # between air (or lung) and fat: edges, a little bowel gas
_GAP_TO_FAT = 0.5  # a scaled map puts at most half as many values there as in fat
_CLIPPED = 0.02  # share of the values at their minimum that marks a clipped bottom
_ABOVE = 0.2  # share of the values at or above 1400 HU that HU without air cannot hold
_SAMPLE = 4_000_000  # voxels summarised at most (an even stride through the scan)
_MAX_LISTED = 10  # patients listed in one message

log = logging.getLogger("lymphdx")


def describe_map(scale: float, offset: float) -> str:
    """``HU = 8 * value - 1024`` (``HU = value`` for the identity)."""
    text = "HU = value" if scale == 1.0 else f"HU = {scale:g} * value"
    if offset:
        text += f" {'-' if offset < 0 else '+'} {abs(offset):g}"
    return text


def describe_storage(scale: float, offset: float) -> str:
    """What the stored values are, as a formula of HU: ``(HU + 1024) / 8``, ``HU * 10``."""
    base = "HU" if offset == 0 else f"(HU {'+' if offset < 0 else '-'} {abs(offset):g})"
    if scale == 1.0:
        return base
    return f"{base} / {scale:g}" if scale > 1.0 else f"{base} * {1.0 / scale:g}"


def storage_maps_text() -> str:
    """The scaled storages of ``STORAGE_MAPS``, for messages."""
    return ", ".join(describe_storage(s, o) for s, o in STORAGE_MAPS)


@dataclass(frozen=True)
class Calibration:
    """A scan's intensity calibration as told by its stored values.

    ``air_mode``: the mode of the air/background cluster (None when the scan has no such
    cluster, e.g. a crop inside the body); ``body_mode``: the mode of the rest (fat or
    soft tissue); both in the file's own units. ``verdict``: ``hu``, ``raw`` (HU + 1024),
    ``scaled`` (another map of ``STORAGE_MAPS``) or ``unknown``. ``scale`` and ``offset``:
    the map ``HU = scale * value + offset`` (None for ``unknown``); ``spread``: 5th to
    95th percentile of the summarised values; ``note``: why a scan is ``unknown`` when
    its modes do not say it (clipped values, values beyond the range read, several maps).
    """

    verdict: str
    air_mode: float | None
    body_mode: float | None
    spread: float | None = None
    scale: float | None = field(default=None)
    offset: float | None = field(default=None)
    note: str | None = None

    def __post_init__(self) -> None:
        known = {"hu": (1.0, 0.0), "raw": (1.0, -RAW_CT_OFFSET)}.get(self.verdict)
        if known is not None and self.scale is None:  # hu and raw need no map given
            object.__setattr__(self, "scale", known[0])
            object.__setattr__(self, "offset", known[1])

    @property
    def map_text(self) -> str | None:
        """``HU = 8 * value - 1024``, or None when the map cannot be told."""
        if self.scale is None or self.offset is None:
            return None
        return describe_map(self.scale, self.offset)

    def describe(self) -> str:
        def shown(v: float | None) -> str:
            return "none" if v is None else f"{v:g}"

        text = (
            f"air/background mode {shown(self.air_mode)}, fat/soft-tissue mode "
            f"{shown(self.body_mode)}"
        )
        if self.spread is not None and self.spread < _MIN_SPREAD:
            text += f", values spread over only {self.spread:.3g}"
        if self.note:
            text += f", {self.note}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "air_mode": self.air_mode,
            "body_mode": self.body_mode,
            "spread": self.spread,
            "scale": self.scale,
            "offset": self.offset,
            "note": self.note,
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
            number(data.get("scale")),
            number(data.get("offset")),
            data.get("note"),
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


@dataclass(frozen=True)
class _Reading:
    """The modes of values read in HU (``air`` None: no air cluster) and their spread."""

    air: float | None
    body: float
    spread: float


def _read(values: np.ndarray) -> _Reading | None:
    """Air and body modes of ``values`` (1-D, taken as HU) by step 1 of the module's rule;
    None when no value lies in [-1200, 1400)."""
    lo, hi = _HIST_RANGE
    inside = values[(values >= lo) & (values < hi)]  # NaN is neither
    if inside.size == 0:
        return None
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
    p5, p95 = np.percentile(inside, [5.0, 95.0])
    return _Reading(air, body, float(p95 - p5))


def _in(value: float | None, bounds: tuple[float, float], shift: float = 0.0) -> bool:
    return value is not None and bounds[0] + shift <= value <= bounds[1] + shift


def _negative(values: np.ndarray) -> float:
    """Share of the finite values below 0, the minimum (which may be padding) left out."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0
    kept = finite[finite != finite.min()]
    return np.count_nonzero(kept < 0) / max(kept.size, 1)


def _scaled_fit(values: np.ndarray, scale: float, offset: float) -> _Reading | None:
    """The HU reading of ``values`` under ``HU = scale * value + offset`` when the map
    fits at least loosely (step 2 of the module's rule, air within step 1's -1200..-700),
    else None."""
    reading = _read(values * scale + offset)
    if reading is None or reading.spread < _MIN_SPREAD:
        return None
    if not (_in(reading.air, _AIR_HU) and _in(reading.body, _BODY_HU)):
        return None
    if offset == -RAW_CT_OFFSET and _negative(values) > _SCALED_NEGATIVE:
        return None
    hu = values * scale + offset
    gap = np.count_nonzero((hu > _GAP_HU[0]) & (hu < _GAP_HU[1]))
    fat = np.count_nonzero((hu >= _FAT_HU[0]) & (hu <= _FAT_HU[1]))
    if gap > _GAP_TO_FAT * fat:  # the fat lies where the map puts no tissue
        return None
    return reading


def intensity_calibration(array: np.ndarray) -> Calibration:
    """Tell the map ``HU = scale * value + offset`` of a scan from its values (the rule in
    the module's docstring). ``array``: any shape; NaN and infinities are left out."""
    values = np.asarray(array).reshape(-1)
    values = values[:: max(1, values.size // _SAMPLE)].astype(np.float64)
    reading = _read(values)
    if reading is None:
        return Calibration("unknown", None, None, None)
    air, body, spread = reading.air, reading.body, round(reading.spread, 3)
    if spread < _MIN_SPREAD:
        return Calibration("unknown", air, body, spread)
    is_hu = _in(body, _BODY_HU) and (air is None or _in(air, _AIR_HU))
    if is_hu and air is not None:
        return Calibration("hu", air, body, spread)
    lo, hi = _HIST_RANGE
    inside = values[(values >= lo) & (values < hi)]
    negative = np.count_nonzero((inside >= -1150.0) & (inside < -200.0)) / inside.size
    raw_air_ok = air is None or _in(air, _AIR_HU, RAW_CT_OFFSET)
    if _in(body, _BODY_HU, RAW_CT_OFFSET) and raw_air_ok and negative <= _RAW_NEGATIVE:
        return Calibration("raw", air, body, spread)

    fits = []
    for scale, offset in STORAGE_MAPS + UNTOLD_MAPS:
        scaled = _scaled_fit(values, scale, offset)
        if scaled is not None:
            fits.append((scale, offset, scaled))
    if (
        len(fits) == 1
        and (fits[0][0], fits[0][1]) in STORAGE_MAPS
        and _in(fits[0][2].air, _SCALED_AIR_HU)
    ):
        scale, offset, scaled = fits[0]
        assert scaled.air is not None
        return Calibration(
            "scaled",
            round((scaled.air - offset) / scale, 3),  # in the file's own units
            round((scaled.body - offset) / scale, 3),
            spread,
            scale,
            offset,
        )
    if fits:  # several maps, or one whose air is not where outside air is
        maps = " or ".join(describe_map(s, o) for s, o, _ in fits)
        if is_hu:
            maps = f"HU without air or {maps}"
        airs = ", ".join(f"{r.air:g}" for _, _, r in fits)
        note = f"could be {maps} (air mapped to {airs} HU)"
        return Calibration("unknown", air, body, spread, note=note)
    if not is_hu:
        return Calibration("unknown", air, body, spread)
    # HU without air: a crop inside the body, unless what was read as the body is not tissue
    finite = values[np.isfinite(values)]
    low = float(finite.min())
    clipped = np.count_nonzero(finite == low) / finite.size
    if clipped >= _CLIPPED and low > _AIR_HU[1]:
        note = f"{100 * clipped:.0f} % of the values clipped at their minimum {low:g}"
        return Calibration("unknown", air, body, spread, note=note)
    considered = finite[finite >= lo]
    above = np.count_nonzero(considered >= hi) / max(considered.size, 1)
    if above >= _ABOVE:
        note = f"{100 * above:.0f} % of the values at {hi:g} or above"
        return Calibration("unknown", air, body, spread, note=note)
    return Calibration("hu", air, body, spread)


def hu_map(calibration: Calibration, cfg: DataConfig) -> tuple[float, float]:
    """``(scale, offset)`` of ``HU = scale * value + offset`` applied to a scan: the
    config's when ``data.hu_scale`` or ``data.hu_offset`` is set (the other 1 or 0), else
    the calibration's, and the identity for an ``unknown`` scan (refused by
    ``check_calibration`` where a set is trained on, warned about by ``predict``)."""
    if cfg.hu_scale is not None or cfg.hu_offset is not None:
        scale = 1.0 if cfg.hu_scale is None else float(cfg.hu_scale)
        return scale, 0.0 if cfg.hu_offset is None else float(cfg.hu_offset)
    if calibration.scale is None or calibration.offset is None:
        return 1.0, 0.0
    return calibration.scale, calibration.offset


def calibrate(
    array: np.ndarray, cfg: DataConfig
) -> tuple[np.ndarray, Calibration, tuple[float, float]]:
    """A scan's values in HU: ``(hu, calibration, (scale, offset))``.

    ``array``: the file's values (any shape, float32 as read); ``hu`` the same shape,
    float32 (``array`` itself for the identity map); ``calibration`` of the file's own
    values; ``(scale, offset)`` the map applied (``hu_map``).
    """
    calibration = intensity_calibration(array)
    scale, offset = hu_map(calibration, cfg)
    if (scale, offset) == (1.0, 0.0):
        return array, calibration, (scale, offset)
    hu = np.asarray(array, dtype=np.float32) * np.float32(scale) + np.float32(offset)
    return hu, calibration, (scale, offset)


# --------------------------------------------------------------------------- calibration of a set


class CalibrationSource(Protocol):
    """What ``check_calibration`` reads: ``lymphdx.data.preprocess.PreprocessCache``."""

    cfg: DataConfig

    def calibration(
        self, path: str | Path, patient: str | None = None
    ) -> tuple[Calibration, float]: ...


def _who(patient: str | None, path: Path) -> str:
    return f"patient {patient!r}" if patient is not None else f"file {str(path)!r}"


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(p) for p in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f" and {len(names) - _MAX_LISTED} more"
    return shown


def check_calibration(
    cache: CalibrationSource,
    sets: dict[str, Sequence[tuple[str | None, Path]]],
    sources: dict[str, Path | None] | None = None,
) -> dict[str, list[str]]:
    """Check each set's intensity calibration (``{set: [(patient, image), ...]}``).

    Scans in raw CT numbers (HU + 1024) or another storage map of HU were corrected by
    the cache: a warning per map names the set, the map and those patients. A scan whose
    calibration cannot be told is refused. Nothing is checked when ``data.hu_scale`` or
    ``data.hu_offset`` is set (the user said what the files hold). ``sources``: each
    set's manifest, named by the error.

    Returns:
        ``{set: [patient (or file) ...]}`` of the corrected scans.

    Raises:
        InputError: naming the set, its manifest and each patient whose calibration
            cannot be told, with its modes.
    """
    if cache.cfg.hu_offset is not None or cache.cfg.hu_scale is not None:
        return {}
    sources = sources or {}
    corrected: dict[str, list[str]] = {}
    for name, items in sets.items():
        unknown: list[tuple[str | None, Path, Calibration]] = []
        maps: dict[tuple[float, float], list[str]] = {}  # the corrected, by map
        for patient, path in items:
            calibration, _ = cache.calibration(path, patient)
            if calibration.verdict == "unknown":
                unknown.append((patient, Path(path), calibration))
            elif calibration.verdict in ("raw", "scaled"):
                assert calibration.scale is not None and calibration.offset is not None
                key = (calibration.scale, calibration.offset)
                maps.setdefault(key, []).append(patient if patient is not None else str(path))
        if unknown:
            listed = "; ".join(
                f"{_who(p, f)} ({c.describe()})" for p, f, c in unknown[:_MAX_LISTED]
            )
            if len(unknown) > _MAX_LISTED:
                listed += f"; and {len(unknown) - _MAX_LISTED} more"
            first_patient, first_path, _ = unknown[0]
            raise InputError(
                f"the {name} set: the calibration of {len(unknown)} of {len(items)} scans "
                "cannot be told, their intensities are neither Hounsfield units (air near "
                "-1000, fat/soft tissue within -200..150) nor raw CT numbers (HU + 1024: "
                "air near 0, fat/soft tissue within 824..1174) nor one of the storage maps "
                f"lymphdx tells ({storage_maps_text()}): {listed}. Check these files "
                "(another modality; normalised, z-scored or windowed values?), or, if you "
                "know the map that takes every scan to HU, set data.hu_offset and "
                "data.hu_scale to it (HU = hu_scale * value + hu_offset; hu_offset 0 if "
                "they are HU, -1024 for raw CT numbers)",
                sources.get(name) or first_path,
                first_patient,
            )
        for (scale, offset), patients in sorted(maps.items()):
            if (scale, offset) == (1.0, -RAW_CT_OFFSET):  # the common case, said plainly
                log.warning(
                    "the %s set: %d of %d scans hold raw CT numbers, not Hounsfield units "
                    "(air near 0, fat/soft tissue near 1000: HU + 1024, the rescale "
                    "intercept left out by the converter); corrected by -1024: %s. Set "
                    "data.hu_offset to choose the offset yourself",
                    name,
                    len(patients),
                    len(items),
                    _listed(patients),
                )
            else:
                log.warning(
                    "the %s set: %d of %d scans hold %s, not Hounsfield units (their air "
                    "and fat/soft-tissue modes fit this map and no other); corrected by "
                    "%s: %s. Set data.hu_scale and data.hu_offset to choose the map yourself",
                    name,
                    len(patients),
                    len(items),
                    describe_storage(scale, offset),
                    describe_map(scale, offset),
                    _listed(patients),
                )
            corrected.setdefault(name, []).extend(patients)
    return corrected
