"""One TCIA patient at a time: read its series, mask and annotations, find the transpose/flip
that aligns the mask with the CT stack (or place its DICOM SEG on the stack by reference,
and compare a NIfTI mask with it), check the node centres, write the aligned mask.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lymphdx.core.errors import InputError
from lymphdx.io.dicom import DicomSeries, read_dicom_series
from lymphdx.io.dicom_headers import SeriesSummary, choose_series, scan_folder
from lymphdx.io.dicom_seg_read import SegOnStack, read_seg_on_stack, seg_referenced_series
from lymphdx.io.dicom_stack import SliceStack
from lymphdx.io.geometry import Geometry
from lymphdx.io.tcia_sources import PatientSources, read_points
from lymphdx.io.volumes import read_image, write_volume

__all__ = [
    "Alignment",
    "IMAGES_DIR",
    "MASKS_DIR",
    "PatientResult",
    "Work",
    "assess",
    "decide",
    "describe_alignment",
    "finish",
]

log = logging.getLogger("lymphdx")

MASKS_DIR = "tcia_masks"
IMAGES_DIR = "tcia_images"

Alignment = tuple[tuple[int, int, int], tuple[bool, bool, bool]]
_IDENTITY: Alignment = ((0, 1, 2), (False, False, False))


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
    mask_source: str | None = None  # the downloaded mask: a NIfTI file or a DICOM SEG


@dataclass
class Work:
    """A patient between assessment and the final choice of alignment."""

    result: PatientResult
    stack: SliceStack
    geometry: Geometry  # of the image (the regular grid)
    mask_path: Path
    mask: np.ndarray | None  # kept while the patient is decided in the first pass
    candidates: list[Alignment]
    best: list[Alignment]  # the candidates with the top annotation score (all if no points)
    geometry_fit: Alignment | None
    points: np.ndarray
    point_lines: list[int]
    mask_geometry_matches: bool


def _choose_folder(
    sources: PatientSources,
) -> tuple[Path, SeriesSummary, int, str | None, list[Path]]:
    """The series folder (rule: most slices of an axial CT), its series, how many series
    that folder holds, a sentence when there was a choice, and the DICOM SEG files found
    in the patient's folders (Modality SEG)."""
    options: list[tuple[Path, SeriesSummary, int]] = []
    segs: list[Path] = []
    for folder in sources.dicom_dirs:
        series, _ = scan_folder(folder)
        for s in series:
            if s.modality == "SEG":
                segs.extend(h.path for h in s.slices)
            else:
                options.append((folder, s, len(series)))
    summaries = [s for _, s, _ in options]
    if not summaries:
        only = f": only DICOM SEG file(s) ({', '.join(map(str, segs))})" if segs else ""
        raise InputError(
            f"no readable DICOM image series in its folder(s){only}; the CT series is missing "
            "(download it again)",
            sources.dicom_dirs[0],
            sources.patient,
        )
    chosen, choice = choose_series(
        summaries, sources.dicom_dirs[0], sources.patient, pick_largest=True
    )
    folder, _, count = next(o for o in options if o[1] is chosen)
    return folder, chosen, count, (choice if len(summaries) > 1 else None), segs


def _choose_seg(segs: list[Path], series_uid: str, patient: str) -> tuple[Path, list[str]]:
    """The one SEG for the series (several: the one whose ReferencedSeriesSequence names it)."""
    if len(segs) == 1:
        return segs[0], []
    mine = [p for p in segs if series_uid in seg_referenced_series(p)]
    if len(mine) == 1:
        others = ", ".join(str(p) for p in segs if p != mine[0])
        return mine[0], [f"DICOM SEG file(s) of other series ignored: {others}"]
    if not mine:
        problem = (
            f"{len(segs)} DICOM SEG files found and none names series {series_uid} in its "
            f"ReferencedSeriesSequence ({', '.join(map(str, segs))}); keep the one made on "
            "this series"
        )
    else:
        problem = (
            f"{len(mine)} DICOM SEG files found for series {series_uid} "
            f"({', '.join(map(str, mine))}); keep one"
        )
    raise InputError(problem, segs[0].parent, patient)


def _read_notes(
    sources: PatientSources, series: DicomSeries, result: PatientResult
) -> tuple[np.ndarray, list[int], Path | None]:
    """The annotated node centres ``(N, 3)`` LPS mm, their lines and file.

    Raises:
        InputError, OSError: an unreadable annotation file.
    """
    points, lines, source = np.zeros((0, 3)), [], None
    if sources.notes.get("points"):
        source = sources.notes["points"][0]
        points, lines = read_points(source, result.patient)
    elif sources.notes.get("indices"):
        source = sources.notes["indices"][0]
        indices, lines = read_points(source, result.patient)
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
    return points, lines, source


def _compare_nifti(path: Path, seg_zyx: np.ndarray, patient: str) -> tuple[bool, str]:
    """Whether the NIfTI mask at ``path``, at its best transpose/flip, equals the SEG's
    ``(z, y, x)`` mask on the stack (nonzero = node), and a sentence saying so."""
    try:
        image = read_image(path, patient)
        mask = sitk.GetArrayFromImage(image)
    except InputError as err:
        return False, f"the NIfTI mask was not compared with the DICOM SEG: {err}"
    candidates = _candidates(mask.shape, seg_zyx.shape) if mask.ndim == 3 else []
    if not candidates:
        return False, (
            f"the NIfTI mask {path} (size {image.GetSize()}) does not fit the CT; the DICOM "
            "SEG is used"
        )
    seg = seg_zyx != 0

    def differ(c: Alignment) -> int:
        return int(np.count_nonzero((_apply(mask, c) != 0) ^ seg))

    best = min(candidates, key=differ)
    n = differ(best)
    if n == 0:
        return True, f"the NIfTI mask agrees voxel for voxel ({describe_alignment(best)})"
    nifti = _apply(mask, best) != 0
    dice = (
        2 * np.count_nonzero(nifti & seg) / max(np.count_nonzero(nifti) + np.count_nonzero(seg), 1)
    )
    return False, (
        f"the NIfTI mask {path} differs from the DICOM SEG in {n} voxel(s) (Dice {dice:.3f} "
        f"at its best transpose/flip, {describe_alignment(best)}): the DICOM SEG is used"
    )


def _copy_image(result: PatientResult, series: DicomSeries, n_series: int, out_dir: Path) -> None:
    """A manifest path must name a folder with one series: else write the image's copy."""
    if n_series > 1:
        path = out_dir / IMAGES_DIR / f"{result.patient}.nii.gz"
        write_volume(path, sitk.GetArrayFromImage(series.image), series.geometry)
        result.image = str(path)
        result.warnings.append(f"series folder holds {n_series} series: image written to {path}")


def _finish_seg(
    work: Work, on_stack: SegOnStack, nifti: Path | None, out_dir: Path
) -> PatientResult:
    """The mask from the patient's DICOM SEG (placed on the CT's stack), compared with the
    NIfTI mask when there is one."""
    result = work.result
    result.warnings.extend(on_stack.warnings)
    by = on_stack.placed_by
    if nifti is not None:
        agrees, sentence = _compare_nifti(nifti, on_stack.array, result.patient)
        if agrees:
            by += "; " + sentence
        else:
            result.warnings.append(sentence)
            log.warning("patient %r: %s", result.patient, sentence)
    work.mask = on_stack.array
    return finish(work, _IDENTITY, by, out_dir)


def assess(sources: PatientSources, root: Path, out_dir: Path) -> Work | PatientResult:
    """Read one patient's series, mask and annotations; score the mask alignments.

    A patient with a DICOM SEG is finished here (the SEG places itself): its result is
    returned; a NIfTI mask's alignment may still wait on other patients (a ``Work``).
    """
    patient = sources.patient
    result = PatientResult(patient, "skipped")
    missing = []
    if not sources.dicom_dirs:
        missing.append(f"no CT series (no folder named {patient} holding DICOM files under {root})")
    for kind, paths in [("mask", sources.masks), *sources.notes.items()]:
        if len(paths) > 1:
            missing.append(
                f"{len(paths)} {kind} files found ({', '.join(map(str, paths))}); keep one"
            )
    if missing or (sources.problems and not sources.dicom_dirs):
        result.problem = "; ".join(sources.problems + missing)
        return result
    result.warnings.extend(sources.problems)
    seg_path = None
    try:
        folder, chosen, n_series, choice, segs = _choose_folder(sources)
        if segs:
            seg_path, notes = _choose_seg(segs, chosen.uid, patient)
            result.warnings.extend(notes)
        elif not sources.masks:
            missing.append(
                f"no mask ({patient}_mask.nii.gz from MED_ABD_LYMPH_MASKS, or a DICOM SEG "
                f"series in the patient's folder, not found under {root})"
            )
            result.problem = "; ".join(sources.problems + missing)
            return result
        series = read_dicom_series(folder, patient, series_uid=chosen.uid)
    except InputError as err:
        result.problem = "; ".join([*sources.problems, str(err)])
        return result
    if choice:
        result.warnings.append(choice)
    result.warnings.extend(series.report.warnings)
    result.series_folder = str(folder)
    result.image = str(folder)
    try:
        points, lines, source = _read_notes(sources, series, result)
    except (InputError, OSError) as err:
        result.problem = str(err)
        return result
    result.nodes = len(points)

    if seg_path is not None:
        result.mask_source = str(seg_path)
        nifti = sources.masks[0] if sources.masks else None
        uid_of = {h.path: h.sop_uid for h in chosen.slices}
        try:
            on_stack = read_seg_on_stack(
                seg_path, series.stack, [uid_of.get(f, "") for f in series.stack.files], patient
            )
        except InputError as err:
            result.problem = str(err)
            if nifti is not None:
                result.problem += f" (the NIfTI mask {nifti} was not used: fix or remove the SEG)"
            return result
        _copy_image(result, series, n_series, out_dir)
        work = Work(
            result=result,
            stack=series.stack,
            geometry=series.geometry,
            mask_path=seg_path,
            mask=None,
            candidates=[_IDENTITY],
            best=[_IDENTITY],
            geometry_fit=_IDENTITY,
            points=points,
            point_lines=lines,
            mask_geometry_matches=False,  # a SEG is not a volume: the mask is always written
        )
        return _finish_seg(work, on_stack, nifti, out_dir)

    mask_path = sources.masks[0]
    result.mask_source = str(mask_path)
    try:
        mask_image = read_image(mask_path, patient)
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
    _copy_image(result, series, n_series, out_dir)
    geometry = Geometry.of(mask_image)
    return Work(
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


def decide(work: Work) -> tuple[Alignment | None, str]:
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


def finish(work: Work, alignment: Alignment, by: str, out_dir: Path) -> PatientResult:
    """Align the mask, check the node centres, write the aligned copy when needed."""
    result = work.result
    patient = result.patient
    mask = work.mask
    if mask is None:
        mask = sitk.GetArrayFromImage(read_image(work.mask_path, patient))
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
        write_volume(path, on_grid.astype(dtype), work.geometry)
        result.mask = str(path)
    result.status = "ok"
    return result
