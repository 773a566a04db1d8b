"""A DICOM SEG read onto the slices of its CT series (highdicom decodes, pydicom headers).

Each frame of the SEG is put on one slice of the CT's stack (as acquired, before any
resampling):

- the slice whose SOPInstanceUID the frame references (per-frame
  DerivationImageSequence > SourceImageSequence), its position, if the frame has one,
  checked to be that slice's;
- for a frame without such a reference, the slice at the frame's ImagePositionPatient
  (PlanePositionSequence); its corner must be the slice's (within a tenth of a voxel),
  which needs the CT's FrameOfReferenceUID.

The SEG's FrameOfReferenceUID must be the CT's, its frames the CT's size, orientation
and pixel spacing. Frames may come in any order and cover only some slices (SEGs leave
empty ones out): uncovered slices are empty. A frame that references an instance not in
the series is refused (the UIDs named), as is one that lies on no slice.

Segments: the ones that say lymph node (SegmentedPropertyType SNOMED CT 59441001, or
"lymph" in the label or code meaning); a SEG with one segment that does not say so is
used with a warning; several and none a lymph node is refused. BINARY frames count
where 1, FRACTIONAL where value / MaximumFractionalValue >= 0.5 (a probability or an
occupancy past one half), LABELMAP where the value is the segment number. The result
holds each voxel's segment number (like the NIfTI masks' node ids), 0 elsewhere; a voxel
in several segments keeps the lowest number, and two frames of one segment on one slice
give their union (both said in the warnings).
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.errors import InputError
from lymphdx.io.dicom_stack import SliceStack

__all__ = ["SegOnStack", "read_seg_on_stack", "seg_referenced_series"]

_LYMPH_NODE_CODES = {("SCT", "59441001"), ("SRT", "T-C4000")}  # SNOMED CT, and its old SRT code
_ON_SLICE = 0.1  # voxels: how far a frame's corner may lie from a slice's
_ORIENTATION_TOL = 1e-3


@dataclass
class SegOnStack:
    """A SEG on the CT stack: ``array`` ``(z, y, x)`` (the stack's ``raw_shape``) holds
    segment numbers, 0 outside every used segment."""

    array: np.ndarray
    segments: dict[int, str]  # used: number -> label
    placed_by: str
    warnings: list[str] = field(default_factory=list)


def seg_referenced_series(path: Path) -> set[str]:
    """The SeriesInstanceUIDs that a SEG's ReferencedSeriesSequence names (headers only;
    empty when unreadable)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return {str(item.SeriesInstanceUID) for item in ds.get("ReferencedSeriesSequence", [])}
    except Exception:  # noqa: BLE001 - an unreadable SEG is refused, clearly, when it is read
        return set()


def _group(ds: Any, i: int, keyword: str) -> Any:
    """Frame ``i``'s functional-group item ``keyword`` (per-frame, else shared), or None."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    items = (
        per_frame[i] if per_frame is not None and i < len(per_frame) else None,
        shared[0] if shared else None,
    )
    for item in items:
        if item is not None and keyword in item and len(item[keyword].value):
            return item[keyword].value
    return None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _is_lymph_node(description: Any) -> bool:
    code = description.segmented_property_type
    words = f"{description.segment_label or ''} {getattr(code, 'meaning', '')}".lower()
    return (str(code.scheme_designator), str(code.value)) in _LYMPH_NODE_CODES or "lymph" in words


def _read(path: Path, patient: str | None) -> Any:
    import highdicom as hd

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")  # highdicom's notes on odd but legal values
            return hd.seg.segread(path)
    except Exception as err:  # noqa: BLE001 - any parser failure is "not a readable SEG"
        text = str(err).strip()
        first = text.splitlines()[0][:160] if text else type(err).__name__
        raise InputError(
            f"not a readable DICOM SEG ({first}); download the SEG series again", path, patient
        ) from None


def _choose_segments(seg: Any, path: Path, patient: str | None) -> tuple[dict[int, str], list[str]]:
    numbers = [int(n) for n in seg.segment_numbers]
    if not numbers:
        raise InputError("the DICOM SEG describes no segment", path, patient)
    labels = {n: str(seg.get_segment_description(n).segment_label or "") for n in numbers}
    nodes = [n for n in numbers if _is_lymph_node(seg.get_segment_description(n))]
    listing = ", ".join(f"{n} {labels[n]!r}" for n in numbers)
    notes = []
    if not nodes:
        if len(numbers) > 1:
            raise InputError(
                f"none of the DICOM SEG's {len(numbers)} segments ({listing}) is a lymph node "
                "(SNOMED CT 59441001 or 'lymph' in its label); remove the SEG and give the "
                "NIfTI mask from MED_ABD_LYMPH_MASKS instead",
                path,
                patient,
            )
        nodes = numbers
        notes.append(
            f"the DICOM SEG's only segment ({listing}) does not say lymph node: used as the mask"
        )
    elif len(nodes) < len(numbers):
        others = ", ".join(f"{n} {labels[n]!r}" for n in numbers if n not in nodes)
        notes.append(f"DICOM SEG segment(s) {others} are not lymph nodes: left out")
    return {n: labels[n] for n in nodes}, notes


def _frame_of_reference(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["FrameOfReferenceUID"])
        return str(ds.get("FrameOfReferenceUID", "") or "")
    except Exception:  # noqa: BLE001 - the series was read already; a missing UID is handled
        return ""


def _check_planes(seg: Any, stack: SliceStack, path: Path, patient: str | None) -> None:
    """Frames the CT's size, orientation and pixel spacing (where the SEG states them)."""
    columns, rows = stack.size_xy
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise InputError(
            f"the DICOM SEG's frames are {seg.Rows} x {seg.Columns} pixels, the CT's slices "
            f"{rows} x {columns} (rows x columns): the SEG is not for this series",
            path,
            patient,
        )
    ct_orientation = np.r_[stack.u, stack.v]
    ct_spacing = np.asarray(stack.spacing_xy[::-1])  # (row spacing, column spacing)
    for i in range(int(seg.get("NumberOfFrames", 1) or 1)):
        orientation = _group(seg, i, "PlaneOrientationSequence")
        o = _floats(orientation[0].get("ImageOrientationPatient"), 6) if orientation else None
        if o is not None and np.max(np.abs(o - ct_orientation)) > _ORIENTATION_TOL:
            raise InputError(
                f"the DICOM SEG's frame {i + 1} has ImageOrientationPatient {o.tolist()}, the "
                f"CT's slices {ct_orientation.round(6).tolist()}: the SEG is not on this series' "
                "slices",
                path,
                patient,
            )
        measures = _group(seg, i, "PixelMeasuresSequence")
        s = _floats(measures[0].get("PixelSpacing"), 2) if measures else None
        if s is not None and not np.allclose(s, ct_spacing, rtol=1e-4, atol=1e-5):
            raise InputError(
                f"the DICOM SEG's frame {i + 1} has PixelSpacing {s.tolist()}, the CT's slices "
                f"{ct_spacing.tolist()}: the SEG is not on this series' pixels",
                path,
                patient,
            )


def _slice_at(stack: SliceStack, position: np.ndarray) -> int | None:
    """The stack index of the slice whose corner is ``position`` (LPS mm), or None."""
    x, y, z = stack.world_to_index(position)[0]
    k = int(round(z))
    if max(abs(x), abs(y), abs(z - k)) > _ON_SLICE or not 0 <= k < len(stack.files):
        return None
    return k


def _place_frames(
    seg: Any,
    stack: SliceStack,
    slice_uids: Sequence[str],
    same_frame: bool,
    path: Path,
    patient: str | None,
) -> tuple[list[int], str]:
    """The stack index of every frame, and what placed them."""
    index = {uid: k for k, uid in enumerate(slice_uids) if uid}
    places: list[int] = []
    missing: dict[str, list[int]] = {}  # referenced UID not in the series -> frames
    off_slice: list[str] = []
    by_reference = by_position = 0
    for i in range(int(seg.get("NumberOfFrames", 1) or 1)):
        refs = []
        for derivation in _group(seg, i, "DerivationImageSequence") or []:
            for source in derivation.get("SourceImageSequence", []):
                if str(source.get("SpatialLocationsPreserved", "YES")).upper() == "NO":
                    raise InputError(
                        f"the DICOM SEG's frame {i + 1} says its pixels do not lie where the "
                        "source slice's do (SpatialLocationsPreserved NO); it cannot be put "
                        "on the CT",
                        path,
                        patient,
                    )
                refs.append(str(source.get("ReferencedSOPInstanceUID", "")))
        plane = _group(seg, i, "PlanePositionSequence")
        position = _floats(plane[0].get("ImagePositionPatient"), 3) if plane else None
        at = _slice_at(stack, position) if position is not None and same_frame else None
        unknown = [r for r in refs if r not in index]
        for r in unknown:
            missing.setdefault(r, []).append(i + 1)
        if unknown:
            continue
        referenced = sorted({index[r] for r in refs})
        if len(referenced) == 1 and (position is None or not same_frame or at == referenced[0]):
            places.append(referenced[0])
            by_reference += 1
            continue
        if at is not None and (not referenced or at in referenced):
            places.append(at)
            by_position += 1
            continue
        where = "no position" if position is None else f"position {position.round(3).tolist()} mm"
        names = ", ".join(stack.files[k].name for k in referenced)
        if len(referenced) > 1 and at is None:
            off_slice.append(
                f"frame {i + 1} ({where}) references {len(referenced)} slices ({names}) and "
                "its position picks none of them"
            )
        elif referenced:
            off_slice.append(f"frame {i + 1} ({where}) references {names} but lies elsewhere")
        elif position is not None and not same_frame:
            off_slice.append(
                f"frame {i + 1} references no slice, and without the CT's FrameOfReferenceUID "
                "its position cannot place it"
            )
        else:
            off_slice.append(f"frame {i + 1} ({where}) references no slice and lies on none")
    if missing:
        uids = list(missing)
        shown = "; ".join(f"{u} (frame(s) {', '.join(map(str, missing[u][:3]))})" for u in uids[:3])
        more = f" and {len(uids) - 3} more" if len(uids) > 3 else ""
        raise InputError(
            f"the DICOM SEG references {len(uids)} CT slice(s) that are not in the series "
            f"read from {stack.files[0].parent}: SOPInstanceUID {shown}{more}; the SEG was "
            "drawn on other slices, or the download is incomplete (download the series again)",
            path,
            patient,
        )
    if off_slice:
        more = f" (and {len(off_slice) - 3} more)" if len(off_slice) > 3 else ""
        raise InputError(
            f"the DICOM SEG's frames cannot be put on the CT's slices: "
            f"{'; '.join(off_slice[:3])}{more}; the SEG was made on another series, or it "
            "is damaged (download it again)",
            path,
            patient,
        )
    how = [
        f"{by_reference} by the CT slice they reference (SOPInstanceUID)" if by_reference else "",
        f"{by_position} by their ImagePositionPatient" if by_position else "",
    ]
    return places, "the DICOM SEG's frames placed: " + " and ".join(h for h in how if h)


def read_seg_on_stack(
    path: str | Path, stack: SliceStack, slice_uids: Sequence[str], patient: str | None = None
) -> SegOnStack:
    """Read the SEG at ``path`` onto ``stack`` (the CT's slices as acquired);
    ``slice_uids[k]`` is the SOPInstanceUID of ``stack.files[k]``.

    Raises:
        InputError: naming the SEG and the patient: not a SEG, another frame of reference,
            frames that reference slices not in the series (their UIDs) or lie on none,
            frames of another size, orientation or spacing, no lymph-node voxel.
    """
    path = Path(path)
    if len(slice_uids) != len(stack.files):
        raise ValueError("slice_uids must give one UID per stack file")
    seg = _read(path, patient)
    seg_frame = str(seg.get("FrameOfReferenceUID", "") or "")
    ct_frame = _frame_of_reference(stack.files[0])
    if seg_frame and ct_frame and seg_frame != ct_frame:
        raise InputError(
            f"the DICOM SEG's FrameOfReferenceUID {seg_frame} is not the CT series' "
            f"{ct_frame}: the SEG was drawn on another scan; keep only the SEG made on this "
            "patient's CT",
            path,
            patient,
        )
    segments, notes = _choose_segments(seg, path, patient)
    _check_planes(seg, stack, path, patient)
    places, placed_by = _place_frames(
        seg, stack, slice_uids, bool(seg_frame and seg_frame == ct_frame), path, patient
    )
    kind = str(seg.SegmentationType).upper()
    labelmap = kind == "LABELMAP"
    max_fraction = float(seg.get("MaximumFractionalValue", 1) or 1)
    out = np.zeros(stack.raw_shape, np.uint8 if max(segments) < 256 else np.uint16)
    seen: dict[tuple[int, int], int] = {}
    repeated: list[str] = []
    overlap = 0
    for i, k in enumerate(places):
        if labelmap:
            wanted = list(segments)
        else:
            ident = _group(seg, i, "SegmentIdentificationSequence")
            number = int(ident[0].ReferencedSegmentNumber) if ident else 0
            if number not in segments:
                continue
            wanted = [number]
        stored = np.asarray(seg.get_stored_frame(i, as_index=True))
        for number in wanted:
            if labelmap:
                inside = stored == number
            elif kind == "FRACTIONAL":
                inside = stored >= 0.5 * max_fraction
            else:
                inside = stored > 0
            if not labelmap:
                if (k, number) in seen:
                    repeated.append(f"frames {seen[k, number]} and {i + 1} on slice {k}")
                seen.setdefault((k, number), i + 1)
            plane = out[k]
            other = inside & (plane != 0) & (plane != number)
            overlap += int(np.count_nonzero(other))
            plane[inside & ((plane == 0) | (plane > number))] = number
    if not out.any():
        listing = ", ".join(f"{n} {label!r}" for n, label in segments.items())
        raise InputError(
            f"the DICOM SEG holds no voxel of its lymph-node segment(s) ({listing}): an "
            "empty mask; remove the SEG and give the NIfTI mask instead",
            path,
            patient,
        )
    if repeated:
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        notes.append(
            f"the DICOM SEG holds several frames of one segment on one slice "
            f"({'; '.join(repeated[:3])}{more}): their union is used"
        )
    if overlap:
        notes.append(
            f"{overlap} voxel(s) lie in more than one DICOM SEG segment: each keeps the "
            "lowest segment number"
        )
    return SegOnStack(out, segments, placed_by, notes)
