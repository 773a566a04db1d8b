"""Scan preparation, written once: read, calibrate, resample onto the working grid, and back.

Training's preprocessing cache (``lymphdx.data.preprocess.PreprocessCache``), ``evaluate``
(through that cache) and ``predict`` all prepare a scan through ``prepare_volume`` (or
``prepare_scan``, which reads it first), so training and inference cannot drift apart:

1. read the file or DICOM folder (``io.volumes.read_volume``; header checks there);
2. refuse a scan far too small for the working grid (``grid.check_coverage``);
3. take its values to Hounsfield units (``calibration.calibrate``: a checked storage map,
   or ``data.hu_scale`` / ``data.hu_offset``);
4. one SimpleITK resample onto the working grid (``grid.canonical_grid``), clipped to
   ``data.hu_window``: ``PreparedScan.array`` ``(z, y, x)`` float32.

``PreparedScan.to_original`` maps an array on the working grid (an ROI map) back onto the
scan's own grid. The per-domain z-score (``preprocess.Normalizer``) is applied after, by
the caller, because it belongs to a run, not to a scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lymphdx.core.config import DataConfig
from lymphdx.data.calibration import Calibration, calibrate, describe_map, describe_storage
from lymphdx.data.grid import (
    Grid,
    canonical_grid,
    check_coverage,
    coverage,
    coverage_warning,
    resample_image,
    to_original,
)
from lymphdx.io import volumes as io
from lymphdx.io.geometry import Volume, to_sitk

__all__ = ["PreparedScan", "cache_meta", "calibration_note", "prepare_scan", "prepare_volume"]


@dataclass(frozen=True)
class PreparedScan:
    """One scan made ready for the network.

    ``array``: ``(z, y, x)`` float32 HU on ``grid``, clipped to ``data.hu_window``.
    ``source``: the scan on its own grid, in HU (after the calibration map).
    ``hu_map``: ``(scale, offset)`` of ``HU = scale * value + offset``, applied to the
    file's values, whose ``calibration`` it records. ``coverage``: the share of the working
    grid the scan fills. ``notes``: warnings for the user (calibration, coverage).
    """

    array: np.ndarray
    grid: Grid
    source: Volume
    calibration: Calibration
    hu_map: tuple[float, float]
    coverage: float
    calibration_note: str | None
    coverage_note: str | None

    @property
    def notes(self) -> tuple[str, ...]:
        """The warnings to show, in order (calibration, coverage)."""
        return tuple(n for n in (self.calibration_note, self.coverage_note) if n is not None)

    @property
    def source_grid(self) -> Grid:
        """The scan's own geometry and size."""
        return Grid(self.source.geometry, self.source.shape_xyz)  # type: ignore[arg-type]

    def to_original(self, array_zyx: np.ndarray, nearest: bool = False) -> np.ndarray:
        """``array_zyx`` ``grid.shape_zyx`` mapped onto the scan's own grid: ``(z, y, x)``
        of the source's shape (linear and float32, or ``nearest`` keeping the dtype;
        outside the working grid 0)."""
        reference = sitk.Image(list(self.source.shape_xyz), sitk.sitkUInt8)
        reference.SetSpacing(self.source.geometry.spacing)
        reference.SetOrigin(self.source.geometry.origin)
        reference.SetDirection(self.source.geometry.direction)
        return sitk.GetArrayFromImage(to_original(array_zyx, self.grid, reference, nearest))


def calibration_note(
    calibration: Calibration, hu_map: tuple[float, float], cfg: DataConfig
) -> str | None:
    """The warning a scan's calibration deserves: none for HU or when ``data.hu_scale`` /
    ``data.hu_offset`` say what scans hold; else what was corrected, or that nothing could
    be told."""
    scale, offset = hu_map
    if cfg.hu_scale is not None or cfg.hu_offset is not None or calibration.verdict == "hu":
        return None
    if calibration.verdict == "raw":
        return (
            "the scan holds raw CT numbers, not Hounsfield units (air near 0, fat/soft "
            "tissue near 1000: HU + 1024); corrected by -1024"
        )
    if calibration.verdict == "scaled":
        return (
            f"the scan holds {describe_storage(scale, offset)}, not Hounsfield units "
            f"({calibration.describe()}: this map fits and no other); corrected by "
            f"{describe_map(scale, offset)}"
        )
    return (
        "the calibration cannot be told: the intensities are neither Hounsfield units nor "
        f"raw CT numbers nor a storage map lymphdx tells ({calibration.describe()}); the "
        "scan was used as it is, so the probability may mean nothing; convert it to HU "
        "(apply its rescale slope and intercept) and predict it again"
    )


def prepare_volume(
    volume: Volume, cfg: DataConfig, path: str | Path | None = None, patient: str | None = None
) -> PreparedScan:
    """Steps 2-4 of the module docstring for a scan already read (``path`` and ``patient``
    are named by errors).

    Raises:
        InputError: a scan far too small for the working grid (``check_coverage``).
    """
    check_coverage(volume.geometry, volume.shape_xyz, cfg, path, patient)
    hu, calibration, hu_map = calibrate(volume.array, cfg)
    source = Volume(hu, volume.geometry)
    grid = canonical_grid(volume.geometry, volume.shape_xyz, cfg)
    array = resample_image(to_sitk(hu, volume.geometry), grid, cfg)
    covered, _ = coverage(volume.geometry, volume.shape_xyz, cfg)
    return PreparedScan(
        array=array,
        grid=grid,
        source=source,
        calibration=calibration,
        hu_map=hu_map,
        coverage=covered,
        calibration_note=calibration_note(calibration, hu_map, cfg),
        coverage_note=coverage_warning(volume.geometry, volume.shape_xyz, cfg),
    )


def prepare_scan(
    path: str | Path,
    cfg: DataConfig,
    patient: str | None = None,
    series_uid: str | None = None,
) -> PreparedScan:
    """Read the scan at ``path`` (a file or a DICOM series folder; ``series_uid`` chooses
    a series) and prepare it (``prepare_volume``)."""
    volume = io.read_volume(Path(path), patient, series_uid)
    return prepare_volume(volume, cfg, path, patient)


def cache_meta(scan: PreparedScan) -> dict[str, Any]:
    """What the preprocessing cache records of a prepared scan beside its array."""
    scale, offset = scan.hu_map
    return {
        "source_geometry": scan.source_grid.to_dict(),
        "grid": scan.grid.to_dict(),
        "calibration": scan.calibration.to_dict(),  # of the file's own values
        "hu_scale": scale,  # HU = hu_scale * value + hu_offset, before resampling
        "hu_offset": offset,
    }
