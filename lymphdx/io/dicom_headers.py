"""DICOM slice headers and series choice: reading the headers (no pixels) with pydicom,
grouping a folder's image files by series, and choosing one series.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.errors import InputError

__all__ = [
    "SeriesSummary",
    "SliceHeader",
    "choose_series",
    "orientation_label",
    "scan_folder",
    "image_series",
    "DERIVED_MODALITIES",
    "syntax_name",
]

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "ImageType",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
]
_AXIAL_COS = float(np.cos(np.radians(45)))  # an axial stack's normal is within 45° of z


@dataclass(frozen=True)
class SliceHeader:
    """What the reader needs from one DICOM image file's header."""

    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    series_number: int | None
    description: str
    image_type: tuple[str, ...]
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None  # 6 direction cosines: row then column
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm
    rows: int
    columns: int
    frames: int
    transfer_syntax: str


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _read_header(path: Path, patient: str | None = None) -> SliceHeader | None:
    """The header of an image file, or None for a non-DICOM or non-image file.

    Raises:
        InputError: a DICOM image file whose header values cannot be decoded.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except Exception:  # noqa: BLE001 - pydicom raises many types for a non-DICOM file
        if path.suffix.lower() != ".dcm":
            return None
        try:  # some exports have no preamble/file meta; trust only a .dcm name for that
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS, force=True)
        except Exception:  # noqa: BLE001 - any parser failure means "not a readable DICOM"
            return None
    try:
        if "Rows" not in ds or "Columns" not in ds or "SeriesInstanceUID" not in ds:
            return None  # DICOMDIR, structured reports, presentation states, ...
        return _header_of(ds, path)
    except Exception as err:  # noqa: BLE001 - values are decoded lazily, any may be damaged
        text = str(err).strip()
        first = text.splitlines()[0][:160] if text else type(err).__name__
        raise InputError(
            f"damaged DICOM header ({first}); export the series again", path, patient
        ) from None


def _header_of(ds: Any, path: Path) -> SliceHeader:
    meta = getattr(ds, "file_meta", None)
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    try:
        number = int(ds.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None  # absent or unreadable: only used to order series
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    image_type = ds.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return SliceHeader(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        modality=str(ds.get("Modality", "") or "").upper(),
        series_number=number,
        description=str(ds.get("SeriesDescription", "") or ""),
        image_type=tuple(str(t).upper() for t in image_type),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=frames,
        transfer_syntax=syntax,
    )


def syntax_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name if uid else "unknown"
    return f"{name} ({uid})" if uid and name != uid else (uid or "unknown")


def orientation_label(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.99:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass(frozen=True)
class SeriesSummary:
    """The image files of one SeriesInstanceUID in a folder."""

    uid: str
    slices: tuple[SliceHeader, ...]

    @property
    def n_slices(self) -> int:
        """Number of image files."""
        return len(self.slices)

    @property
    def modality(self) -> str:
        """The most common Modality of the files ('' when absent)."""
        return Counter(s.modality for s in self.slices).most_common(1)[0][0]

    @property
    def series_number(self) -> int | None:
        """SeriesNumber of the first file."""
        return self.slices[0].series_number

    @property
    def normal(self) -> np.ndarray | None:
        """Slice normal (row × column direction) of the first file with an orientation."""
        for s in self.slices:
            if s.orientation is not None:
                o = np.asarray(s.orientation)
                n = np.cross(o[:3], o[3:])
                norm = float(np.linalg.norm(n))
                return n / norm if norm > 0 else None
        return None

    @property
    def is_axial(self) -> bool:
        """True when the slice normal lies within 45° of the patient's z axis."""
        n = self.normal
        return n is not None and abs(float(n[2])) >= _AXIAL_COS

    @property
    def is_localizer(self) -> bool:
        """True when the files say LOCALIZER (scout) in ImageType."""
        return any("LOCALIZER" in s.image_type for s in self.slices)

    def describe(self) -> str:
        """One line: UID, modality, orientation, slice count, description."""
        n = self.normal
        orient = orientation_label(n) if n is not None else "no orientation"
        frames = sum(max(s.frames, 1) for s in self.slices)
        count = f"{frames} slices" if frames == self.n_slices else f"{self.n_slices} files"
        text = f"{self.uid} ({self.modality or 'no modality'}, {orient}, {count}"
        if self.is_localizer:
            text += ", localizer"
        if self.slices[0].description:
            text += f", {self.slices[0].description!r}"
        return text + ")"


def scan_folder(folder: str | Path, patient: str | None = None) -> tuple[list[SeriesSummary], int]:
    """The image series in ``folder`` (not recursive) and the number of other files.

    Series are sorted by SeriesNumber then UID.

    Raises:
        InputError: an image file whose header is damaged (names it and ``patient``).
    """
    folder = Path(folder)
    groups: dict[str, list[SliceHeader]] = {}
    others = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file():
            continue
        header = _read_header(Path(entry.path), patient)
        if header is None:
            others += 1
            continue
        groups.setdefault(header.series_uid, []).append(header)
    series = [SeriesSummary(uid, tuple(slices)) for uid, slices in groups.items()]
    series.sort(key=lambda s: (s.series_number if s.series_number is not None else 1 << 30, s.uid))
    return series, others


#: Modalities of DICOM objects that annotate images rather than being images to read (a
#: SEG over the series, as TCIA ships its masks, an RT structure set, reports, ...).
DERIVED_MODALITIES = frozenset({"SEG", "RTSTRUCT", "SR", "PR", "KO", "REG"})


def image_series(folder: str | Path, patient: str | None = None) -> tuple[list[SeriesSummary], int]:
    """``scan_folder``'s series less those of ``DERIVED_MODALITIES`` (a SEG beside its CT
    is not a second image series), which count among the other files."""
    series, others = scan_folder(folder, patient)
    images = [s for s in series if s.modality not in DERIVED_MODALITIES]
    others += sum(s.n_slices for s in series if s.modality in DERIVED_MODALITIES)
    return images, others


def choose_series(
    series: list[SeriesSummary],
    folder: Path,
    patient: str | None = None,
    series_uid: str | None = None,
    pick_largest: bool = False,
) -> tuple[SeriesSummary, str]:
    """Pick one series; returns it and a sentence saying how it was chosen.

    With ``series_uid`` that series; else the only one; else, with ``pick_largest``, the
    one with most slices among axial non-localizer CT series (ties: lowest SeriesNumber).

    Raises:
        InputError: no series, an unknown ``series_uid``, or several without a rule.
    """
    if not series:
        hint = ""
        if any(p.is_dir() for p in folder.iterdir()):
            hint = " (it has subfolders: give the folder that holds the slice files)"
        raise InputError(f"folder holds no DICOM series{hint}", folder, patient)
    listing = "; ".join(s.describe() for s in series)
    if series_uid is not None:
        for s in series:
            if s.uid == series_uid:
                return s, f"series {s.uid} chosen by its SeriesInstanceUID"
        raise InputError(
            f"series {series_uid} is not in the folder; it holds {len(series)} series: {listing}",
            folder,
            patient,
        )
    if len(series) == 1:
        return series[0], f"series {series[0].uid}, the only image series in the folder"
    if not pick_largest:
        # the advice names what can be done: predict takes a UID, training's manifests
        # do not (they name folders), so for them the folder must hold one series
        raise InputError(
            f"folder holds {len(series)} DICOM series: {listing}; choose one with "
            "`lymphdx predict --series-uid UID`, or give a folder that holds only the "
            "series to use",
            folder,
            patient,
        )

    def rank(s: SeriesSummary) -> tuple:
        number = s.series_number if s.series_number is not None else 1 << 30
        return (s.modality == "CT", s.is_axial, not s.is_localizer, s.n_slices, -number)

    ranked = sorted(series, key=rank, reverse=True)
    best = ranked[0]
    tied = rank(ranked[1])[:4] == rank(best)[:4]
    tie = " (tied on slice count; lowest SeriesNumber taken)" if tied else ""
    return best, (
        f"series {best.uid} ({best.n_slices} slices) chosen by the rule 'most slices of an "
        f"axial CT'{tie} among {len(series)} series: {listing}"
    )
