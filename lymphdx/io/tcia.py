"""TCIA "CT Lymph Nodes": a strong-set manifest from the collection as users have it on disk.

What is found under ``root`` (any nesting, found by name):

- a folder per patient, ``ABD_LYMPH_001`` … / ``MED_LYMPH_001`` …, holding its CT series
  (NBIA Data Retriever: ``<manifest>/CT Lymph Nodes/<patient>/<study>/<series>/1-001.dcm``
  with a ``metadata.csv`` whose ``File Location`` points at each series; or flat, the
  slices right in the patient folder);
- ``<patient>_mask.nii.gz`` (``MED_ABD_LYMPH_MASKS``): one instance id per node;
- the current release's DICOM SEG series (Modality SEG in the headers, in any folder below
  the patient's, e.g. ``<patient>/<study>/300.000000-Segmentation-…/1-1.dcm``);
- ``<patient>_lymphnodes_physicalPoints.txt`` (node centres, world x y z in mm, LPS as
  ITK writes it), ``_indices.txt`` and ``_sizes.txt`` (``MED_ABD_LYMPH_ANNOTATIONS``).

The masks' arrays are not in the DICOM stack's axis order. Every transpose/flip of the
mask array that gives the stack's shape is tried; the one that puts the most annotated
node centres inside a node wins (ties: the one the mask's own header geometry agrees with,
then the one most other patients needed); a mask that no transpose/flip fits is refused.
Where the mask is not already on the image's grid with its geometry, an aligned copy is
written to ``<csv folder>/tcia_masks/<patient>.nii.gz``; the download is never modified.
A DICOM SEG needs no guessing: its frames are put on the CT's slices by the
SOPInstanceUIDs they reference (or their positions), see :mod:`lymphdx.io.dicom_seg_read`,
and the mask is written to ``tcia_masks/<patient>.nii.gz`` on the image's grid (the
manifest's masks stay volumes that SimpleITK reads, and the SEG's checks run once, here).
Where a patient has both, the SEG is used (it is the current release's form, and placed by
reference) and the NIfTI mask, at its best transpose/flip, is compared with it: a
difference is a warning; a SEG that cannot be used leaves the patient out, it is not
silently replaced by the NIfTI mask.
Each annotated centre is checked to lie inside the mask; patients where one does not are
reported. ``<csv stem>_report.json`` holds the per-patient report.

The files are found by :mod:`lymphdx.io.tcia_sources` and each patient is read and its
mask aligned by :mod:`lymphdx.io.tcia_patients`; this module writes the manifest and report.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lymphdx.core.errors import InputError
from lymphdx.core.files import path_problem, write_csv, write_json
from lymphdx.io.tcia_patients import Alignment, PatientResult, Work, assess, decide, finish
from lymphdx.io.tcia_sources import find_sources

__all__ = ["REGIONS", "TciaReport", "prepare_tcia", "report_path"]

log = logging.getLogger("lymphdx")

REGIONS: dict[str, tuple[str, ...]] = {"abd": ("ABD",), "med": ("MED",), "all": ("ABD", "MED")}


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
            out.extend(f"{p.patient}: {w}" for w in p.warnings if "DICOM SEG" in w)
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
        why = path_problem(root) or "is not a folder"
        raise InputError(f"TCIA download folder {why}", root)
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
    pending: list[Work] = []
    decided: Counter[Alignment] = Counter()
    for patient, sources in wanted.items():
        log.info("prepare-tcia: %s", patient)
        work = assess(sources, root, out_dir)
        if isinstance(work, PatientResult):
            results[patient] = work
            continue
        alignment, by = decide(work)
        if alignment is None:
            work.mask = None  # re-read when decided: keeps memory to one patient's volumes
            pending.append(work)
            continue
        if "annotated" in by:
            decided[alignment] += 1
        results[patient] = finish(work, alignment, by, out_dir)
        del work
    for work in pending:
        patient = work.result.patient
        common = [a for a, _ in decided.most_common() if a in work.best]
        if common:
            n = decided[common[0]]
            by = f"the alignment that the annotations decided for {n} other patient(s)"
            why = "no annotations" if not len(work.points) else "the annotations could not decide"
            work.result.warnings.append(f"mask aligned like other patients: {why}")
            results[patient] = finish(work, common[0], by, out_dir)
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
    rows = (
        [p.patient, _relative(p.image, out_dir), _relative(p.mask, out_dir)]  # type: ignore[arg-type]
        for p in report.written
    )
    write_csv(out_csv, ["patient_id", "image", "mask"], rows)
    return report
