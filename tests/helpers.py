"""Shared test fixture helpers: small volumes, DICOM series and manifests made on the fly."""

from __future__ import annotations

import csv
import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# A proper rotation (det +1) with no axis aligned to the world frame: exercises direction.
OBLIQUE_DIRECTION: tuple[float, ...] = tuple(
    float(v)
    for v in (
        np.array(
            [
                [np.cos(0.3), -np.sin(0.3), 0.0],
                [np.sin(0.3), np.cos(0.3), 0.0],
                [0.0, 0.0, 1.0],
            ]
        )
        @ np.array(
            [
                [1.0, 0.0, 0.0],
                [0.0, np.cos(0.2), -np.sin(0.2)],
                [0.0, np.sin(0.2), np.cos(0.2)],
            ]
        )
    ).ravel()
)


def make_dicom_series(
    folder: str | Path,
    shape: tuple[int, int, int] = (4, 8, 8),
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    origin: tuple[float, float, float] = (-10.0, 20.0, 30.0),
    series_uid: str | None = None,
    intercept: float = -1024.0,
    slope: float = 1.0,
    stored: np.ndarray | None = None,
    patient_id: str = "P001",
    shuffle_seed: int = 0,
) -> tuple[Path, np.ndarray, str]:
    """Write an axial CT series (one file per slice, shuffled file names) into ``folder``.

    ``shape`` is ``(z, y, x)``; ``spacing``/``origin`` are ITK ``(x, y, z)`` in mm (LPS).
    Slices lie along +z at ``origin[2] + k * spacing[2]``. ``stored`` (int16, ``(z, y, x)``)
    defaults to ``k * 100 + y * 8 + x`` style ramps, so slice order is visible.

    Returns ``(folder, stored, series_uid)``; HU = ``stored * slope + intercept``.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = shape
    if stored is None:
        zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
        stored = (zz * 100 + yy * nx + xx).astype(np.int16)
    stored = np.asarray(stored, dtype=np.int16)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    frame_uid = generate_uid()
    order = list(range(nz))
    random.Random(shuffle_seed).shuffle(order)
    for file_index, k in enumerate(order):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        # Deliberately not equal to the slice index, so readers must sort by position.
        ds.InstanceNumber = file_index + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.Rows = ny
        ds.Columns = nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        # Names depend on the series (several series can share a folder) and are not in
        # slice order.
        name = f"S{zlib.crc32(series_uid.encode()):08x}_{(file_index * 7919) % 100003:06d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
    return folder, stored, series_uid


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a small CSV (header + rows) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows([list(r) for r in rows])
    return path


def touch_images(folder: str | Path, names: Sequence[str]) -> None:
    """Create empty placeholder files (manifest tests check existence, not content)."""
    folder = Path(folder)
    for name in names:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
