"""A binary ROI mask as a DICOM Segmentation (highdicom) beside its source CT series.

The SEG references every source slice (SOP Instance UID) and keeps the study's
identifiers (patient, study, frame of reference), so PACS viewers, OHIF and 3D Slicer
show it over the scan. Its one segment is "lymph node" (SNOMED CT 59441001), found by an
automatic algorithm (lymphdx). Empty slices are kept as frames, so the SEG has one frame
per source slice in the series' order.

The mask must lie on the series' own slices: a series that the reader resampled (uneven
slice spacing, gantry tilt) gets no SEG, and a series without the attributes a SEG needs
(e.g. FrameOfReferenceUID) neither; both are said by ``write_dicom_seg``'s return value,
and no half-written file is left.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lymphdx.core.errors import InputError
from lymphdx.core.files import atomic_path
from lymphdx.io.dicom_headers import choose_series, image_series
from lymphdx.io.dicom_stack import build_stack

__all__ = ["series_slices", "write_dicom_seg"]


def series_slices(
    folder: Path, patient: str | None = None, series_uid: str | None = None
) -> tuple[tuple[Path, ...], bool]:
    """The slice files of the series that ``read_dicom_series`` reads from ``folder`` (the
    only one, or ``series_uid``), in the order of the volume's slices, and whether they lie
    on its regular grid as they are (headers only, no pixels)."""
    series, _ = image_series(folder, patient)
    chosen, _ = choose_series(series, folder, patient, series_uid, False)
    stack, _ = build_stack(chosen.slices, folder, patient, "resample")
    return stack.files, stack.regular


def write_dicom_seg(
    path: Path,
    mask_zyx: np.ndarray,
    folder: Path,
    patient: str | None = None,
    series_uid: str | None = None,
) -> str | None:
    """Write ``mask_zyx`` ``(z, y, x)`` (nonzero = lymph node), on the grid that
    ``read_dicom_series(folder, series_uid=series_uid)`` returns, as a DICOM SEG at
    ``path``. Returns None, or why no SEG was written."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from lymphdx import __version__

    files, regular = series_slices(folder, patient, series_uid)
    if not regular:
        return (
            "no DICOM SEG: the series was resampled onto a regular grid (uneven slice "
            "spacing or gantry tilt), so the mask does not lie on its slices"
        )
    mask = np.asarray(mask_zyx) > 0
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # headers do
    if mask.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise InputError(
            f"mask {mask.shape} does not match the series' {len(sources)} slices of "
            f"{sources[0].Rows} x {sources[0].Columns}",
            folder,
            patient,
        )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lymph node",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.LymphNode,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="lymphdx", version=__version__, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    try:
        with warnings.catch_warnings():
            # the source's one-component PatientName ("P001"): copied as it is, not our concern
            warnings.filterwarnings(
                "ignore", message=".*intended person name", category=UserWarning
            )
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=mask.astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[segment],
                series_instance_uid=hd.UID(),
                series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="lymphdx",
                manufacturer_model_name="lymphdx",
                software_versions=__version__,
                device_serial_number="0",
                series_description="lymphdx lymph node ROI",
                omit_empty_frames=False,
            )
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        return f"no DICOM SEG: the series lacks what a DICOM SEG needs ({err})"
    with atomic_path(path) as tmp:
        seg.save_as(tmp)
    return None
