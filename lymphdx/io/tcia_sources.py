"""TCIA "CT Lymph Nodes" files on disk: each patient's DICOM folders, masks and annotation
files found by name under a download root (and NBIA ``metadata.csv`` checks), and the
node-centre points read from an annotation file.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymphdx.core.errors import InputError

__all__ = ["PatientSources", "find_sources", "read_points"]

_PATIENT = re.compile(r"^(ABD|MED)_LYMPH_\d+$", re.IGNORECASE)
_MASK_SUFFIXES = ("_mask.nii.gz", "_mask.nii")
_NOTES = {
    "points": "_lymphnodes_physicalPoints.txt",
    "indices": "_lymphnodes_indices.txt",
    "sizes": "_lymphnodes_sizes.txt",
}


@dataclass
class PatientSources:
    """What was found on disk for one patient."""

    patient: str
    dicom_dirs: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    notes: dict[str, list[Path]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # e.g. folders metadata.csv lists


def _is_dicom_file(name: str, path: str) -> bool:
    lower = name.lower()
    if lower.endswith(".dcm"):
        return True
    if "." in name:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _patient_of(path: Path, root: Path) -> str | None:
    for part in reversed((root.name, *path.relative_to(root).parts)):  # root may be one
        if _PATIENT.match(part):
            return part.upper()
    return None


def _metadata_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [
                {k.strip(): (v or "").strip() for k, v in row.items() if k}
                for row in csv.DictReader(f)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read NBIA metadata.csv: {err}", path) from None


def find_sources(root: str | Path) -> dict[str, PatientSources]:
    """Every patient found under ``root`` by folder or file name, with its files."""
    root = Path(root)
    found: dict[str, PatientSources] = {}

    def get(patient: str) -> PatientSources:
        return found.setdefault(patient, PatientSources(patient))

    metadata: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        n_dicom = 0
        for name in sorted(filenames):
            for suffix in _MASK_SUFFIXES:
                if name.endswith(suffix) and _PATIENT.match(name[: -len(suffix)]):
                    get(name[: -len(suffix)].upper()).masks.append(here / name)
            for kind, suffix in _NOTES.items():
                if name.endswith(suffix) and _PATIENT.match(name[: -len(suffix)]):
                    get(name[: -len(suffix)].upper()).notes.setdefault(kind, []).append(here / name)
            if name.lower() == "metadata.csv":
                metadata.append(here / name)
            elif n_dicom == 0 and _is_dicom_file(name, os.path.join(dirpath, name)):
                n_dicom = 1
        if n_dicom:
            patient = _patient_of(here, root)
            if patient is not None:
                get(patient).dicom_dirs.append(here)
    for path in metadata:
        for row in _metadata_rows(path):
            patient = row.get("Subject ID", "").upper()
            location = row.get("File Location", "")
            if not _PATIENT.match(patient) or not location:
                continue
            modality = row.get("Modality", "CT").upper()
            if modality not in ("CT", "SEG", ""):
                continue
            parts = [p for p in re.split(r"[\\/]+", location) if p not in ("", ".")]
            folder = path.parent.joinpath(*parts)
            sources = get(patient)
            if not folder.is_dir():
                sources.problems.append(
                    f"{path} lists {'DICOM SEG ' if modality == 'SEG' else ''}series "
                    f"{row.get('Series UID', '?')} at {location!r} but "
                    "that folder is missing (incomplete download? run the NBIA Data "
                    "Retriever again)"
                )
                continue
            expected = row.get("Number of Images", "")
            have = sum(
                1 for e in os.scandir(folder) if e.is_file() and _is_dicom_file(e.name, e.path)
            )
            if expected.isdigit() and have < int(expected):
                sources.problems.append(
                    f"series folder {folder} holds {have} of the {expected} slices that "
                    f"{path.name} lists (incomplete download?)"
                )
    return found


# --------------------------------------------------------------------------- annotations


def read_points(path: Path, patient: str) -> tuple[np.ndarray, list[int]]:
    """``(N, 3)`` numbers, one node per non-empty line (first three columns), and the
    lines' numbers in the file."""
    rows, numbers = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields[:3]]
        except ValueError:
            values = []
        if len(values) != 3 or not np.all(np.isfinite(values)):
            raise InputError(f"line {number} is not three numbers: {line.strip()!r}", path, patient)
        rows.append(values)
        numbers.append(number)
    return np.asarray(rows, dtype=float).reshape(-1, 3), numbers
