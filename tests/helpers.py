"""Shared test fixture helpers: small volumes, DICOM series and manifests made on the fly."""

from __future__ import annotations

import copy
import csv
import random
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from lymphdx.core.config import Config

# Every option of issue 8 on at once (the ablation tries them one by one): the tests of
# their wiring train ssmdmt with these, whatever ssmdmt-plus adopts.
ALL_OPTIONS: dict[str, dict[str, object]] = {
    "propagation": {
        "teacher": "ema",
        "method": "graph",
        "pseudo_labels": "soft",
        "curriculum": True,
        "roi_ignore_low": 0.2,
        "roi_cls_gate": 0.5,
    },
    "training": {"selection": "ema"},
}

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


# --------------------------------------------------------------------------- real DICOM files
# Series re-written from the DICOM files that pydicom ships (CT_small.dcm: a real 128×128
# abdominal CT slice; MR_small*.dcm: one MR slice stored uncompressed and compressed).

AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _testdata(name: str):
    import pydicom
    from pydicom.data import get_testdata_file

    return pydicom.dcmread(get_testdata_file(name))


class CtSeries:
    """What :func:`write_ct_series` wrote: ``hu[k]`` is the slice at ``positions[k]``."""

    def __init__(self, **kw: object) -> None:
        self.folder: Path = kw["folder"]  # type: ignore[assignment]
        self.hu: np.ndarray = kw["hu"]  # type: ignore[assignment]
        self.positions: np.ndarray = kw["positions"]  # type: ignore[assignment]
        self.orientation: tuple[float, ...] = kw["orientation"]  # type: ignore[assignment]
        self.spacing_xy: tuple[float, float] = kw["spacing_xy"]  # type: ignore[assignment]
        self.series_uid: str = kw["series_uid"]  # type: ignore[assignment]
        self.files: list[Path] = kw["files"]  # type: ignore[assignment]

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation)
        return np.cross(o[:3], o[3:])

    def geometry_matrix(self) -> np.ndarray:
        """4×4 LPS affine of ``(x, y, z)`` indices for a regular stack (positions[0] first)."""
        o = np.asarray(self.orientation)
        a = np.eye(4)
        a[:3, 0] = o[:3] * self.spacing_xy[0]
        a[:3, 1] = o[3:] * self.spacing_xy[1]
        a[:3, 2] = self.positions[1] - self.positions[0]
        a[:3, 3] = self.positions[0]
        return a


def write_ct_series(
    folder: str | Path,
    n_slices: int = 6,
    *,
    crop: tuple[int, int] | None = None,
    step: float = 2.5,
    origin: tuple[float, float, float] = (-158.135803, -179.035797, -75.7),
    orientation: Sequence[float] = AXIAL,
    positions: Sequence[Sequence[float]] | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    patient_id: str = "P001",
    shuffle_seed: int = 0,
    slopes: Sequence[float] | None = None,
    intercept: float = -1024.0,
    compress: str | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 2,
    name_prefix: str = "1-",
) -> CtSeries:
    """Write a multi-slice series made of pydicom's real ``CT_small.dcm`` into ``folder``.

    Slice ``k`` stores CT_small's pixels + 10·k (so the order shows) at ``positions[k]``
    (default: ``origin + k·step·normal``). File names (``1-001.dcm`` …) and InstanceNumber
    are shuffled with respect to the positions. ``compress``: ``"rle"`` (RLE Lossless,
    pydicom's own encoder) or ``"undecodable"`` (an HTJ2K transfer syntax with junk data).
    """
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless, RLELossless, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = _testdata("CT_small.dcm")
    base = template.pixel_array.astype(np.int16)
    if crop is not None:
        base = np.ascontiguousarray(base[: crop[0], : crop[1]])
    ny, nx = base.shape
    spacing_y, spacing_x = (float(s) for s in template.PixelSpacing)
    o = np.asarray(orientation, dtype=float)
    normal = np.cross(o[:3], o[3:])
    if positions is None:
        n_slices = len(slopes) if slopes is not None else n_slices
        positions = [np.asarray(origin) + k * step * normal for k in range(n_slices)]
    positions = np.asarray(positions, dtype=float)
    n_slices = len(positions)
    slopes = list(slopes) if slopes is not None else [1.0] * n_slices
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    names = list(range(1, n_slices + 1))
    random.Random(shuffle_seed).shuffle(names)
    numbers = list(range(1, n_slices + 1))
    random.Random(shuffle_seed + 1).shuffle(numbers)
    hu = np.empty((n_slices, ny, nx), np.float32)
    files = []
    for k in range(n_slices):
        stored = (base + 10 * k).astype(np.int16)
        hu[k] = stored.astype(np.float32) * slopes[k] + intercept
        ds = copy.deepcopy(template)
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = study_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.ImageType = list(image_type)
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [round(float(p), 6) for p in positions[k]]
        ds.ImageOrientationPatient = [round(float(x), 8) for x in o]
        ds.SliceLocation = round(float(positions[k] @ normal), 6)
        ds.SliceThickness = step
        ds.Rows, ds.Columns = ny, nx
        ds.RescaleSlope = slopes[k]
        ds.RescaleIntercept = intercept
        if compress == "rle":
            ds.compress(RLELossless, stored, generate_instance_uid=False)
        elif compress == "undecodable":
            ds.file_meta.TransferSyntaxUID = HTJ2KLossless
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(200))])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stored.tobytes()
        path = folder / f"{name_prefix}{names[k]:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return CtSeries(
        folder=folder,
        hu=hu,
        positions=positions,
        orientation=tuple(float(x) for x in o),
        spacing_xy=(spacing_x, spacing_y),
        series_uid=series_uid,
        files=files,
    )


def write_compressed_mr_series(
    folder: str | Path, source: str = "MR_small_jpeg_ls_lossless.dcm", n_slices: int = 3
) -> tuple[Path, np.ndarray]:
    """A series of pydicom's compressed ``MR_small`` slice (its compressed bytes kept).

    Returns ``(folder, expected)``: ``expected`` is the uncompressed ``MR_small.dcm``
    pixel array (the compression is lossless), the same for every slice.
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    template = _testdata(source)
    series_uid = generate_uid()
    for k in range(n_slices):
        ds = copy.deepcopy(template)
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [-83.9063, -91.2, 6.6406 + 5.0 * k]
        ds.InstanceNumber = n_slices - k
        ds.save_as(folder / f"mr{(k * 7) % n_slices}_{k}.dcm", enforce_file_format=True)
    expected = _testdata("MR_small.dcm").pixel_array.astype(np.float32)
    return folder, expected


# --------------------------------------------------------------------------- TCIA trees
# Shaped like TCIA "CT Lymph Nodes": DICOM series per patient, instance-id masks in
# MED_ABD_LYMPH_MASKS (stored transposed, as the collection's masks are), annotations in
# MED_ABD_LYMPH_ANNOTATIONS.

TCIA_NODES: tuple[tuple[int, int, int], ...] = ((30, 84, 2), (95, 40, 4), (64, 100, 5))
"""Node centres as image ``(x, y, z)`` voxel indices (shifted per patient); asymmetric
so that no transpose or flip maps one centre onto another node."""


class TciaCase:
    """A fixture patient: its series, the mask on the image grid and the node centres."""

    def __init__(self, patient: str, series: CtSeries, mask: np.ndarray, points: np.ndarray):
        self.patient = patient
        self.series = series
        self.mask = mask  # (z, y, x) instance ids on the CT grid
        self.points = points  # (N, 3) LPS mm


def tcia_mask(shape: tuple[int, int, int], shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Instance-id mask (ids 1, 2, 5) of three box nodes and their ``(x, y, z)`` centres."""
    mask = np.zeros(shape, np.uint8)
    centres = []
    for node_id, (x, y, z) in zip((1, 2, 5), TCIA_NODES, strict=True):
        x, y = x + shift, y - shift
        mask[max(z - 1, 0) : z + 2, y - 4 : y + 5, x - 3 : x + 4] = node_id
        centres.append((x, y, z))
    return mask, np.asarray(centres, dtype=float)


def write_tcia_mask(path: Path, mask_zyx: np.ndarray, style: str, geometry_matrix: np.ndarray):
    """Write a mask file as the collection does (``style="tcia"``: x and y swapped, unit
    header) or ``"aligned"`` (image grid and geometry), ``"flip_z"`` (slices reversed,
    unit header), ``"swap_flip_z"``."""
    import SimpleITK as sitk

    array = mask_zyx
    if style in ("tcia", "swap_flip_z"):
        array = np.swapaxes(array, 1, 2)
    if style in ("flip_z", "swap_flip_z"):
        array = array[::-1]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if style == "aligned":
        a = geometry_matrix
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        image.SetSpacing(tuple(float(s) for s in spacing))
        image.SetOrigin(tuple(float(x) for x in a[:3, 3]))
        image.SetDirection(tuple(float(d) for d in (a[:3, :3] / spacing).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)


def make_tcia_tree(
    root: str | Path,
    layout: str = "nested",
    patients: Sequence[str] = ("ABD_LYMPH_001", "ABD_LYMPH_002", "MED_LYMPH_001"),
    mask_style: str | dict[str, str] = "tcia",
    n_slices: int = 8,
) -> dict[str, TciaCase]:
    """Write a TCIA-shaped tree under ``root``; returns the cases by patient id.

    ``layout="nested"``: as the NBIA Data Retriever writes it
    (``manifest-…/CT Lymph Nodes/<patient>/<study>/<series>/1-001.dcm`` + ``metadata.csv``)
    with ``MED_ABD_LYMPH_MASKS/<patient>/`` and ``MED_ABD_LYMPH_ANNOTATIONS/<patient>/``;
    ``layout="flat"``: ``<patient>/*.dcm`` and all masks and annotation files in two flat
    folders.
    """
    root = Path(root)
    cases: dict[str, TciaCase] = {}
    rows = []
    manifest = root / "manifest-1600000000000"
    for i, patient in enumerate(patients):
        study = f"09-14-2014-NA-{patient.replace('_', '')}-{30270 + i}"
        series_name = f"2.000000-{patient.replace('_', '')}-{26820 + i}"
        if layout == "nested":
            folder = manifest / "CT Lymph Nodes" / patient / study / series_name
            masks, notes = (
                root / "MED_ABD_LYMPH_MASKS" / patient,
                root / "MED_ABD_LYMPH_ANNOTATIONS" / patient,
            )
        else:
            folder = root / patient
            masks, notes = root / "masks", root / "annotations"
        series = write_ct_series(
            folder,
            n_slices,
            origin=(-158.1 + 3 * i, -179.0, -75.7 - 10 * i),
            patient_id=patient,
            shuffle_seed=i,
        )
        mask, centres = tcia_mask(series.hu.shape, shift=2 * i)
        affine = series.geometry_matrix()
        points = (affine @ np.c_[centres, np.ones(len(centres))].T).T[:, :3]
        style = mask_style if isinstance(mask_style, str) else mask_style.get(patient, "tcia")
        write_tcia_mask(masks / f"{patient}_mask.nii.gz", mask, style, affine)
        notes.mkdir(parents=True, exist_ok=True)
        (notes / f"{patient}_lymphnodes_physicalPoints.txt").write_text(
            "".join(f"{p[0]:.4f} {p[1]:.4f} {p[2]:.4f}\n" for p in points)
        )
        (notes / f"{patient}_lymphnodes_indices.txt").write_text(
            "".join(f"{int(c[0])} {int(c[1])} {int(c[2])}\n" for c in centres)
        )
        (notes / f"{patient}_lymphnodes_sizes.txt").write_text(
            "".join("4.6 6.0\n" for _ in centres)
        )
        cases[patient] = TciaCase(patient, series, mask, points)
        location = "\\".join([".", "CT Lymph Nodes", patient, study, series_name])
        rows.append([series.series_uid, "CT Lymph Nodes", patient, "CT", n_slices, location])
    if layout == "nested":
        write_csv(
            manifest / "metadata.csv",
            [
                "Series UID",
                "Collection",
                "Subject ID",
                "Modality",
                "Number of Images",
                "File Location",
            ],
            rows,
        )
    return cases


# -- shared by the test modules that train tiny models and call the command line ----------


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids oversubscribing a busy machine's cores
    (autouse in every module that imports it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One preprocessing cache per module: its volumes are preprocessed once."""
    return tmp_path_factory.mktemp("module_cache")


def cli(*args: object, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``lymphdx ARGS`` in-process: (exit status, output)."""
    from typer.testing import CliRunner

    from lymphdx.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    return result.exit_code, result.output


def one_error(code: int, output: str, *words: str) -> str:
    """Exit status 2, no traceback, one ``lymphdx: error:`` line holding every word."""
    assert code == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("lymphdx: error:")]
    assert len(errors) == 1, output
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return errors[0]


def run_config(cache: Path, **overrides: object) -> Config:
    """``tiny_config`` with its preprocessing cache in ``cache`` (``data`` keys merged)."""
    from tests.conftest import tiny_config

    data = {"cache_dir": str(cache), **overrides.pop("data", {})}  # type: ignore[dict-item]
    return tiny_config(cache, data=data, **overrides)


def manifests(data: Path) -> tuple[Path, Path]:
    """The weak and strong manifests of a ``tiny_data`` folder."""
    return data / "weak" / "manifest.csv", data / "strong" / "manifest.csv"


def history(run: Path) -> list[dict[str, str]]:
    """A run's ``history.csv`` rows without the (timing) ``seconds`` column."""
    with open(run / "history.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]
