"""TCIA "CT Lymph Nodes": a strong-set manifest from the collection as users have it on disk.

What is found under ``root`` (any nesting, found by name):

- a folder per patient, ``ABD_LYMPH_001`` … / ``MED_LYMPH_001`` …, holding its CT series
  (NBIA Data Retriever: ``<manifest>/CT Lymph Nodes/<patient>/<study>/<series>/1-001.dcm``
  with a ``metadata.csv`` whose ``File Location`` points at each series; or flat, the
  slices right in the patient folder);
- ``<patient>_mask.nii.gz`` (``MED_ABD_LYMPH_MASKS``): one instance id per node;
- ``<patient>_lymphnodes_physicalPoints.txt`` (node centres, world x y z in mm, LPS as
  ITK writes it), ``_indices.txt`` and ``_sizes.txt`` (``MED_ABD_LYMPH_ANNOTATIONS``).

The masks' arrays are not in the DICOM stack's axis order. Every transpose/flip of the
mask array that gives the stack's shape is tried; the one that puts the most annotated
node centres inside a node wins (ties: the one the mask's own header geometry agrees with,
then the one most other patients needed); a mask that no transpose/flip fits is refused.
Where the mask is not already on the image's grid with its geometry, an aligned copy is
written to ``<csv folder>/tcia_masks/<patient>.nii.gz``; the download is never modified.
Each annotated centre is checked to lie inside the mask; patients where one does not are
reported. ``<csv stem>_report.json`` holds the per-patient report.
"""

from __future__ import annotations

import csv
import io as _io
import itertools
import logging
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.core.files import atomic_path, write_json
from lymphdx.io import volumes as io
from lymphdx.io.dicom import (
    DicomSeries,
    SeriesSummary,
    SliceStack,
    choose_series,
    read_dicom_series,
    scan_folder,
)

__all__ = [
    "REGIONS",
    "PatientResult",
    "TciaReport",
    "describe_alignment",
    "find_sources",
    "prepare_tcia",
    "report_path",
]

log = logging.getLogger("lymphdx")

REGIONS: dict[str, tuple[str, ...]] = {"abd": ("ABD",), "med": ("MED",), "all": ("ABD", "MED")}
_PATIENT = re.compile(r"^(ABD|MED)_LYMPH_\d+$", re.IGNORECASE)
_MASK_SUFFIXES = ("_mask.nii.gz", "_mask.nii")
_NOTES = {
    "points": "_lymphnodes_physicalPoints.txt",
    "indices": "_lymphnodes_indices.txt",
    "sizes": "_lymphnodes_sizes.txt",
}
MASKS_DIR = "tcia_masks"
IMAGES_DIR = "tcia_images"

Alignment = tuple[tuple[int, int, int], tuple[bool, bool, bool]]
_IDENTITY: Alignment = ((0, 1, 2), (False, False, False))


# --------------------------------------------------------------------------- discovery


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
            if row.get("Modality", "CT").upper() not in ("CT", ""):
                continue
            parts = [p for p in re.split(r"[\\/]+", location) if p not in ("", ".")]
            folder = path.parent.joinpath(*parts)
            sources = get(patient)
            if not folder.is_dir():
                sources.problems.append(
                    f"{path} lists series {row.get('Series UID', '?')} at {location!r} but "
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


def _read_points(path: Path, patient: str) -> tuple[np.ndarray, list[int]]:
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


# --------------------------------------------------------------------------- alignment


def _candidates(mask_shape: tuple[int, ...], target: tuple[int, ...]) -> list[Alignment]:
    """Axis permutations and flips of a ``(z, y, x)`` mask array that give ``target``."""
    out = []
    for perm in itertools.permutations(range(3)):
        if tuple(mask_shape[p] for p in perm) == tuple(target):
            out.extend((perm, flips) for flips in itertools.product((False, True), repeat=3))
    return out  # type: ignore[return-value]


def _apply(mask: np.ndarray, alignment: Alignment) -> np.ndarray:
    perm, flips = alignment
    array = np.transpose(mask, perm)
    axes = tuple(i for i, f in enumerate(flips) if f)
    return np.flip(array, axes) if axes else array


def describe_alignment(alignment: Alignment) -> str:
    """Words for a transpose/flip of a ``(z, y, x)`` array."""
    perm, flips = alignment
    names = "zyx"
    parts = []
    moved = [i for i in range(3) if perm[i] != i]
    if len(moved) == 2:
        parts.append(f"{names[moved[0]]} and {names[moved[1]]} swapped")
    elif moved:
        parts.append(
            "axes (z, y, x) taken from the mask's (" + ", ".join(names[p] for p in perm) + ")"
        )
    flipped = [names[i] for i, f in enumerate(flips) if f]
    if flipped:
        parts.append(" and ".join(flipped) + " reversed")
    return "; ".join(parts) if parts else "as stored"


def _geometry_alignment(
    mask_image: sitk.Image, series: DicomSeries, candidates: list[Alignment]
) -> Alignment | None:
    """The candidate that the mask's own header geometry agrees with, if any."""
    shape = sitk.GetArrayViewFromImage(mask_image).shape
    corners = np.array(list(itertools.product(*[(0, s - 1) for s in shape])), dtype=float)
    world = np.array(
        [mask_image.TransformContinuousIndexToPhysicalPoint(tuple(c[::-1])) for c in corners]
    )
    on_stack = series.stack.world_to_index(world)[:, ::-1]  # (z, y, x)
    target = series.stack.raw_shape
    for perm, flips in candidates:
        mapped = corners[:, perm].copy()
        for j, f in enumerate(flips):
            if f:
                mapped[:, j] = target[j] - 1 - mapped[:, j]
        if np.allclose(mapped, on_stack, atol=0.25):
            return (perm, flips)
    return None


def _hits(mask: np.ndarray, index_zyx: np.ndarray) -> np.ndarray:
    """Instance id at each rounded index (0 outside the array)."""
    r = np.round(index_zyx).astype(int)
    inside = np.all((r >= 0) & (r < np.asarray(mask.shape)), axis=1)
    values = np.zeros(len(r), dtype=np.int64)
    if inside.any():
        ri = r[inside]
        values[inside] = mask[ri[:, 0], ri[:, 1], ri[:, 2]]
    return values


# --------------------------------------------------------------------------- per patient


@dataclass
class PatientResult:
    """What happened to one patient; ``status`` is ``ok`` or ``skipped``."""

    patient: str
    status: str
    problem: str | None = None
    image: str | None = None
    mask: str | None = None
    series_folder: str | None = None
    alignment: str | None = None
    aligned_by: str | None = None
    nodes: int = 0
    nodes_outside: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Work:
    """A patient between assessment and the final choice of alignment."""

    result: PatientResult
    stack: SliceStack
    geometry: io.Geometry  # of the image (the regular grid)
    mask_path: Path
    mask: np.ndarray | None  # kept while the patient is decided in the first pass
    candidates: list[Alignment]
    best: list[Alignment]  # the candidates with the top annotation score (all if no points)
    geometry_fit: Alignment | None
    points: np.ndarray
    point_lines: list[int]
    mask_geometry_matches: bool


def _choose_folder(sources: PatientSources) -> tuple[Path, SeriesSummary, int, str | None]:
    """The series folder (rule: most slices of an axial CT), its series, how many series
    that folder holds, and a sentence when there was a choice."""
    options: list[tuple[Path, SeriesSummary, int]] = []
    for folder in sources.dicom_dirs:
        series, _ = scan_folder(folder)
        options.extend((folder, s, len(series)) for s in series)
    summaries = [s for _, s, _ in options]
    if not summaries:
        raise InputError(
            "no readable DICOM image series in its folder(s)",
            sources.dicom_dirs[0],
            sources.patient,
        )
    chosen, choice = choose_series(
        summaries, sources.dicom_dirs[0], sources.patient, pick_largest=True
    )
    folder, _, count = next(o for o in options if o[1] is chosen)
    return folder, chosen, count, (choice if len(summaries) > 1 else None)


def _assess(sources: PatientSources, root: Path, out_dir: Path) -> _Work | PatientResult:
    """Read one patient's series, mask and annotations; score the mask alignments."""
    patient = sources.patient
    result = PatientResult(patient, "skipped")
    missing = []
    if not sources.dicom_dirs:
        missing.append(f"no CT series (no folder named {patient} holding DICOM files under {root})")
    if not sources.masks:
        missing.append(
            f"no mask ({patient}_mask.nii.gz from MED_ABD_LYMPH_MASKS not found under {root})"
        )
    for kind, paths in [("mask", sources.masks), *sources.notes.items()]:
        if len(paths) > 1:
            missing.append(
                f"{len(paths)} {kind} files found ({', '.join(map(str, paths))}); keep one"
            )
    if missing or (sources.problems and not sources.dicom_dirs):
        result.problem = "; ".join(sources.problems + missing)
        return result
    result.warnings.extend(sources.problems)
    try:
        folder, chosen, n_series, choice = _choose_folder(sources)
        series = read_dicom_series(folder, patient, series_uid=chosen.uid)
    except InputError as err:
        result.problem = "; ".join([*sources.problems, str(err)])
        return result
    if choice:
        result.warnings.append(choice)
    result.warnings.extend(series.report.warnings)
    result.series_folder = str(folder)
    result.image = str(folder)

    mask_path = sources.masks[0]
    try:
        mask_image = io.read_image(mask_path, patient)
    except InputError as err:
        result.problem = str(err)
        return result
    if mask_image.GetDimension() != 3 or mask_image.GetNumberOfComponentsPerPixel() != 1:
        result.problem = str(InputError("mask is not a scalar 3-D volume", mask_path, patient))
        return result
    mask = sitk.GetArrayFromImage(mask_image)
    target = series.stack.raw_shape
    candidates = _candidates(mask.shape, target)
    if not candidates:
        result.problem = str(
            InputError(
                f"mask size {mask_image.GetSize()} (x, y, z) cannot be made the CT's size "
                f"{target[::-1]} (x, y, z, {target[0]} slices) by any transpose or flip; "
                "the mask is not for this series (or slices are missing)",
                mask_path,
                patient,
            )
        )
        if sources.problems:
            result.problem += "; " + "; ".join(sources.problems)
        return result

    points, lines, source = np.zeros((0, 3)), [], None
    try:
        if sources.notes.get("points"):
            source = sources.notes["points"][0]
            points, lines = _read_points(source, patient)
        elif sources.notes.get("indices"):
            source = sources.notes["indices"][0]
            indices, lines = _read_points(source, patient)
            affine = series.stack.stack_geometry().affine_lps()
            points = (affine @ np.c_[indices, np.ones(len(indices))].T).T[:, :3]
            result.warnings.append(
                f"no physicalPoints file: node centres taken from {source.name} as (x, y, z) "
                "voxel indices of the CT stack"
            )
        else:
            result.warnings.append(
                "no annotation files (MED_ABD_LYMPH_ANNOTATIONS): the node-centre check is skipped"
            )
        if sources.notes.get("sizes") and len(points):
            text = sources.notes["sizes"][0].read_text(errors="replace")
            n_sizes = sum(1 for line in text.splitlines() if line.split())
            if n_sizes != len(points):
                result.warnings.append(f"{n_sizes} node sizes but {len(points)} node centres")
    except (InputError, OSError) as err:
        result.problem = str(err)
        return result
    result.nodes = len(points)

    index_zyx = series.stack.world_to_index(points)[:, ::-1] if len(points) else np.zeros((0, 3))
    geometry_fit = _geometry_alignment(mask_image, series, candidates)
    if len(points):
        scores = {}
        for c in candidates:
            values = _hits(_apply(mask, c), index_zyx)
            scores[c] = (int(np.count_nonzero(values)), len(set(values[values != 0].tolist())))
        top = max(scores.values())
        if top[0] == 0:
            result.problem = str(
                InputError(
                    f"the mask cannot be aligned with the CT: no transpose or flip of it puts "
                    f"any of the {len(points)} annotated node centres ({source.name}) inside a "
                    "node; the mask or the annotations belong to another scan",
                    mask_path,
                    patient,
                )
            )
            return result
        best = [c for c in candidates if scores[c] == top]
    else:
        best = list(candidates)
    if n_series > 1:  # a manifest path must name a folder with one series: write a copy
        path = out_dir / IMAGES_DIR / f"{patient}.nii.gz"
        io.write_volume(path, sitk.GetArrayFromImage(series.image), series.geometry)
        result.image = str(path)
        result.warnings.append(f"series folder holds {n_series} series: image written to {path}")
    geometry = io.Geometry.of(mask_image)
    return _Work(
        result=result,
        stack=series.stack,
        geometry=series.geometry,
        mask_path=mask_path,
        mask=mask,
        candidates=candidates,
        best=best,
        geometry_fit=geometry_fit,
        points=points,
        point_lines=lines,
        mask_geometry_matches=geometry.close_to(series.geometry),
    )


def _decide(work: _Work) -> tuple[Alignment | None, str]:
    """The alignment the patient's own data decide, and by what (None: undecided)."""
    has_points = len(work.points) > 0
    if has_points and len(work.best) == 1:
        by = "annotated node centres"
        if work.geometry_fit == work.best[0]:
            by += " and the mask's header geometry"
        return work.best[0], by
    if work.geometry_fit is not None and work.geometry_fit in work.best:
        return work.geometry_fit, (
            "annotated node centres (tie) and the mask's header geometry"
            if has_points
            else "the mask's header geometry alone (no annotations)"
        )
    return None, ""


def _finish(work: _Work, alignment: Alignment, by: str, out_dir: Path) -> PatientResult:
    """Align the mask, check the node centres, write the aligned copy when needed."""
    result = work.result
    patient = result.patient
    mask = work.mask
    if mask is None:
        mask = sitk.GetArrayFromImage(io.read_image(work.mask_path, patient))
    aligned = np.ascontiguousarray(_apply(mask, alignment))
    result.alignment = describe_alignment(alignment)
    result.aligned_by = by
    if len(work.points):
        index_zyx = work.stack.world_to_index(work.points)[:, ::-1]
        values = _hits(aligned, index_zyx)
        for line, point, value in zip(work.point_lines, work.points, values, strict=True):
            if value == 0:
                result.nodes_outside.append(
                    {"line": line, "point_mm": [round(float(p), 3) for p in point]}
                )
        if result.nodes_outside:
            lines = ", ".join(str(o["line"]) for o in result.nodes_outside)
            message = (
                f"{len(result.nodes_outside)} of {len(work.points)} annotated node centres "
                f"lie outside the mask (lines {lines} of the annotation file)"
            )
            result.warnings.append(message)
            log.warning("patient %r: %s", patient, message)
    on_grid, _ = work.stack.to_regular(aligned, nearest=True)
    if alignment == _IDENTITY and work.stack.regular and work.mask_geometry_matches:
        result.mask = str(work.mask_path)
    else:
        path = out_dir / MASKS_DIR / f"{patient}.nii.gz"
        low, high = int(on_grid.min()), int(on_grid.max())
        dtype = (
            np.uint8
            if 0 <= low and high < 256
            else np.uint16
            if 0 <= low and high < 65536
            else np.int32
        )
        io.write_volume(path, on_grid.astype(dtype), work.geometry)
        result.mask = str(path)
    result.status = "ok"
    return result


# --------------------------------------------------------------------------- the command


@dataclass
class TciaReport:
    """The outcome of :func:`prepare_tcia`."""

    root: str
    csv: str
    region: str
    patients: list[PatientResult]
    other_region: int = 0

    @property
    def written(self) -> list[PatientResult]:
        """Patients in the manifest."""
        return [p for p in self.patients if p.status == "ok"]

    @property
    def skipped(self) -> list[PatientResult]:
        """Patients left out, each with its problem."""
        return [p for p in self.patients if p.status != "ok"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out = asdict(self)
        out["n_written"], out["n_skipped"] = len(self.written), len(self.skipped)
        return out

    def lines(self) -> list[str]:
        """A human summary, one line per fact."""
        out = [f"{len(self.written)} patient(s) written to {self.csv} (region {self.region})"]
        for p in self.written:
            if p.alignment != "as stored":
                out.append(f"{p.patient}: mask aligned ({p.alignment}) by {p.aligned_by}")
            if p.nodes_outside:
                out.append(
                    f"{p.patient}: {len(p.nodes_outside)} of {p.nodes} annotated node centres "
                    "lie outside the mask"
                )
        for p in self.skipped:
            out.append(f"{p.patient}: skipped: {p.problem}")
        if self.other_region:
            out.append(f"{self.other_region} patient(s) of other regions not included (--region)")
        return out


def _relative(path: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(path).resolve().as_posix()


def report_path(out_csv: str | Path) -> Path:
    """Where :func:`prepare_tcia` writes its report: ``<csv stem>_report.json`` beside it."""
    out_csv = Path(out_csv)
    return out_csv.parent / f"{out_csv.stem}_report.json"


def prepare_tcia(root: str | Path, out_csv: str | Path, region: str = "abd") -> TciaReport:
    """Write a strong-set manifest (``patient_id,image,mask``) for the TCIA download.

    Patients that cannot be used are left out and reported with their problem; the
    report is also written to ``<csv stem>_report.json``.

    Raises:
        InputError: ``root`` missing, no patient of the region found, or none usable.
    """
    root, out_csv = Path(root), Path(out_csv)
    if region not in REGIONS:
        raise InputError(f"unknown region {region!r}; use one of {', '.join(REGIONS)}")
    if not root.is_dir():
        raise InputError("TCIA download folder does not exist", root)
    out_dir = out_csv.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    found = find_sources(root)
    prefixes = REGIONS[region]
    wanted = {p: s for p, s in sorted(found.items()) if p.split("_")[0] in prefixes}
    if not wanted:
        raise InputError(
            f"no {'/'.join(f'{x}_LYMPH_###' for x in prefixes)} patients found (folders or "
            "mask/annotation files named after them); point --root at the unpacked TCIA "
            "CT Lymph Nodes download",
            root,
        )
    results: dict[str, PatientResult] = {}
    pending: list[_Work] = []
    decided: Counter[Alignment] = Counter()
    for patient, sources in wanted.items():
        log.info("prepare-tcia: %s", patient)
        work = _assess(sources, root, out_dir)
        if isinstance(work, PatientResult):
            results[patient] = work
            continue
        alignment, by = _decide(work)
        if alignment is None:
            work.mask = None  # re-read when decided: keeps memory to one patient's volumes
            pending.append(work)
            continue
        if "annotated" in by:
            decided[alignment] += 1
        results[patient] = _finish(work, alignment, by, out_dir)
        del work
    for work in pending:
        patient = work.result.patient
        common = [a for a, _ in decided.most_common() if a in work.best]
        if common:
            n = decided[common[0]]
            by = f"the alignment that the annotations decided for {n} other patient(s)"
            why = "no annotations" if not len(work.points) else "the annotations could not decide"
            work.result.warnings.append(f"mask aligned like other patients: {why}")
            results[patient] = _finish(work, common[0], by, out_dir)
            continue
        reason = (
            f"{len(work.best)} transposes/flips fit the annotated node centres equally"
            if len(work.points)
            else "no annotation files, and the mask's header geometry does not match the CT"
        )
        work.result.problem = str(
            InputError(
                f"the mask cannot be aligned with the CT: {reason}, and no other patient's "
                "alignment settles it",
                work.mask_path,
                patient,
            )
        )
        results[patient] = work.result
    report = TciaReport(
        root=str(root),
        csv=str(out_csv),
        region=region,
        patients=[results[p] for p in sorted(results)],
        other_region=len(found) - len(wanted),
    )
    for p in report.skipped:
        log.warning("patient %r skipped: %s", p.patient, p.problem)
    write_json(report_path(out_csv), report.to_dict())
    if not report.written:
        first = report.skipped[0]
        raise InputError(
            f"none of the {len(report.skipped)} patient(s) could be used; first problem: "
            f"{first.problem} (all in {report_path(out_csv)})",
            root,
            first.patient,
        )
    buffer = _io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["patient_id", "image", "mask"])
    for p in report.written:
        writer.writerow([p.patient, _relative(p.image, out_dir), _relative(p.mask, out_dir)])  # type: ignore[arg-type]
    with atomic_path(out_csv) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", newline="")
    return report
