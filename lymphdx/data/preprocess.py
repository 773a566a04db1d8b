"""Preprocessing: one resample onto a canonical grid, HU clipping, per-domain z-score, cache.

Every volume is mapped by ONE SimpleITK resample onto a canonical grid: identity direction
(so every scan has the same anatomical axis order, x→L, y→P, z→S in LPS, whatever its
orientation on disk), ``DataConfig.shape`` voxels ``(x, y, z)``, centred on the physical
centre of the input's field of view.

* ``fit == "crop"``: grid spacing is ``DataConfig.spacing`` (resample-to-spacing plus centre
  crop/pad in one step).
* ``fit == "resize"``: spacing = extent of the input's world-axis bounding box / shape, so
  the whole field of view is stretched onto the shape.

Images: linear interpolation, outside → ``hu_window[0]``, clipped to ``hu_window``, float32
``(z, y, x)``. Masks: nearest neighbour onto the grid computed from the IMAGE's geometry,
binarised, uint8 ``(z, y, x)``.

Intensity calibration: the fixed ``hu_window`` is only right for Hounsfield units. Some
converters and archives write raw CT numbers (air at 0, soft tissue near 1060: HU + 1024,
the rescale intercept dropped), which the window would clip to a flat 350 inside the
body, or other linear maps of HU (``(HU + 1024) / 8`` as uint8, ...). So each scan's map
``HU = scale * value + offset`` is told when it is preprocessed (``calibrate``, the rule in
``lymphdx.data.calibration``) and applied before resampling (the entry records the
calibration and the map); ``check_calibration`` then reports per set (weak, strong) which
patients were corrected and by which map (a warning) and refuses the set when a scan's
calibration cannot be told. ``data.hu_scale`` / ``data.hu_offset`` set give the map of
every scan instead, with no check (they are part of ``settings_key``; unset, the key and
every array of a scan in HU are what they were before the check existed). An entry made
by an earlier rule whose verdict the current rule may change (HU without an air cluster,
or unknown) is remade.

Percentile windows (nnU-Net's CT scheme: clip to the 0.5-99.5 percentiles of the labelled
foreground, then z-score) are deliberately not offered. The window would be fitted to
each set's own distribution, so it would absorb a calibration error instead of exposing
it, and a single scan at ``predict`` time has no set to fit it on; the weak set has no
foreground masks to take percentiles of; and the per-domain z-score after the fixed HU
window already removes the linear calibration differences between hospitals (gain,
offset) that a per-domain window would address. Fixed HU plus a checked calibration keeps
intensities physical (fat, soft tissue and vessels land at the same values for every
hospital), which is also what the paper does.

Cache layout (``PreprocessCache``)::

    cache_dir/
      hashes.json                  content-hash memo: resolved path -> stat signature + sha256
      <settings_key>/
        img-<sha256(image)>.npy    (z, y, x) float32 canonical image
        img-<sha256(image)>.json   grid, source geometry and size, settings
        mask-<sha256(mask hash + image hash)>.npy / .json   (z, y, x) uint8 canonical mask

Everything is written atomically (temporary name + rename), so concurrent writers are
last-writer-wins and a reader never sees half a file.

Where it lives: the grid, coverage checks and resampling in ``lymphdx.data.grid``; a scan's
intensity calibration and the set-level check (``check_calibration``, re-exported here) in
``lymphdx.data.calibration``; the cache and normalisation here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphdx.core.config import DataConfig
from lymphdx.core.errors import InputError, LymphdxError
from lymphdx.core.files import atomic_path, folder_problem, path_problem, write_json
from lymphdx.data.calibration import Calibration, check_calibration
from lymphdx.data.grid import Grid, resample_mask
from lymphdx.data.scan_prep import cache_meta, prepare_scan
from lymphdx.io import volumes as io
from lymphdx.io.geometry import to_sitk

__all__ = [
    "PREPROCESS_VERSION",
    "check_calibration",
    "settings_key",
    "content_hash",
    "source_files",
    "PreprocessCache",
    "Normalizer",
    "fit_normalizers",
    "save_normalizers",
    "load_normalizers",
]

#: Bump when the preprocessing changes in a way that invalidates cached arrays.
PREPROCESS_VERSION = 1

_MMAP_BYTES = 64 * 2**20  # cached arrays larger than this are memory-mapped read-only
_CHUNK = 1 << 20

log = logging.getLogger("lymphdx")


# --------------------------------------------------------------------------- keys and hashing


def _settings(cfg: DataConfig) -> dict[str, Any]:
    return {
        "version": PREPROCESS_VERSION,
        "spacing": [float(v) for v in cfg.spacing],
        "shape": None if cfg.shape is None else [int(v) for v in cfg.shape],
        "fit": cfg.fit,
        "hu_window": [float(v) for v in cfg.hu_window],
        # only when set, so the default key (and cache) is what it was before the key
        **({} if cfg.hu_offset is None else {"hu_offset": float(cfg.hu_offset)}),
        **({} if cfg.hu_scale is None else {"hu_scale": float(cfg.hu_scale)}),
    }


#: How files are read, where a change alters the arrays of some files only (so the settings
#: key, and with it every cache entry, stays): 2 = NIfTI placed by its header as the
#: standard says (``io.nifti_geometry``), where ITK mirrored an axis with a negative pixdim
#: or took the qform over the sform. Entries of NIfTI files read before are remade once.
READER_VERSION = 2
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


def _read_as_now(meta: dict[str, Any], source: Path) -> bool:
    """Whether an entry's ``source`` file was read as ``READER_VERSION`` reads it."""
    if int(meta.get("reader", 1)) >= READER_VERSION:
        return True
    return not source.name.lower().endswith(_NIFTI_SUFFIXES)


def _current(meta: dict[str, Any]) -> bool:
    """Whether an image entry's calibration is the current rule's: entries from before the
    calibration check (none recorded) and, from before the scaled maps (no ``scale``),
    those read as HU without an air cluster or unknown (which the scaled maps may now
    tell) are remade; HU with air and raw CT numbers read as before (same arrays)."""
    calibration = meta.get("calibration")
    if not isinstance(calibration, dict):
        return False
    if "scale" in calibration:
        return True
    verdict = calibration.get("verdict")
    return verdict == "raw" or (verdict == "hu" and calibration.get("air_mode") is not None)


def settings_key(cfg: DataConfig) -> str:
    """Short hash of everything that changes preprocessing (and ``PREPROCESS_VERSION``)."""
    text = json.dumps(_settings(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_NIFTI_PAIRS = {".hdr": ".img", ".img": ".hdr", ".hdr.gz": ".img.gz", ".img.gz": ".hdr.gz"}


def _header_data_file(path: Path) -> Path | None:
    """The other file of a two-file volume: the data file named in an ``.mhd`` /
    ``.nhdr`` header, or the other half of a NIfTI/Analyze ``.hdr`` + ``.img`` pair."""
    name = path.name.lower()
    for ending, other in _NIFTI_PAIRS.items():
        if name.endswith(ending):
            return path.with_name(path.name[: -len(ending)] + other)
    suffix = path.suffix.lower()
    if suffix not in (".mhd", ".nhdr"):
        return None
    try:
        with path.open("r", encoding="latin-1") as f:
            for line in f:
                if suffix == ".mhd" and "=" in line:
                    key, value = (s.strip() for s in line.split("=", 1))
                    if key == "ElementDataFile":
                        ok = value and value.upper() != "LOCAL" and " " not in value
                        return path.parent / value if ok else None
                if suffix == ".nhdr" and ":" in line:
                    key, value = (s.strip() for s in line.split(":", 1))
                    if key.lower() in ("data file", "datafile"):
                        return path.parent / value if " " not in value else None
    except OSError:
        return None
    return None


def source_files(path: Path) -> list[Path]:
    """The files whose bytes make up a volume: a DICOM folder's files (sorted), a header +
    data file pair (``.mhd``/``.nhdr``, NIfTI ``.hdr``/``.img``), or the file itself."""
    if path.is_dir():
        return sorted((p for p in path.iterdir() if p.is_file()), key=lambda p: p.name)
    data = _header_data_file(path)
    return [path, data] if data is not None and data.is_file() else [path]


def content_hash(path: str | Path) -> str:
    """SHA-256 of a volume's content (hex).

    A single file: the hash of its bytes (``sha256sum``). A folder (DICOM series) or a
    header + data pair: the hash of every file's name, length and bytes, sorted by name.
    """
    path = Path(path)
    files = source_files(path)
    h = hashlib.sha256()
    if not path.is_dir() and len(files) == 1:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    for file in files:
        h.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
        h.update(file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _stat_signature(path: Path) -> str:
    """Cheap fingerprint (size, mtime_ns, inode of each source file) of a volume on disk."""
    parts = []
    for file in source_files(path):
        st = file.stat()
        parts.append(f"{file.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}")
    if len(parts) == 1:
        return parts[0]
    return "sha1:" + hashlib.sha1("\n".join(parts).encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------------- cache


class PreprocessCache:
    """Content-addressed on-disk cache of canonical images and masks for one ``DataConfig``.

    ``image``/``mask`` return the preprocessed array, reading and resampling the source
    only when no entry exists for its content and settings. The content hash is memoised
    per path with a stat signature (size, mtime_ns, inode), in memory and in
    ``cache_dir/hashes.json``, so neither an epoch nor a later run re-hashes unchanged files.
    Arrays are not kept in memory (that is the dataset's choice); entries over 64 MB are
    returned memory-mapped read-only.
    """

    def __init__(self, cache_dir: str | Path, cfg: DataConfig):
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.key = settings_key(cfg)
        self.root = self.cache_dir / self.key
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise LymphdxError(
                f"cannot use {str(self.cache_dir)!r} as the preprocessing cache folder "
                "(data.cache_dir, else $LYMPHDX_CACHE, else ~/.cache/lymphdx): "
                f"{folder_problem(self.cache_dir) or err.strerror}"
            ) from None
        self._index_path = self.cache_dir / "hashes.json"
        self._hashes: dict[str, dict[str, str]] = self._read_index()

    # ---- content hashes

    def _read_index(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._index_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {
            k: v
            for k, v in data.items()
            if isinstance(v, dict) and isinstance(v.get("stat"), str) and "sha256" in v
        }

    def content_hash(self, path: str | Path, patient: str | None = None) -> str:
        """SHA-256 of ``path``'s content, memoised by stat signature (memory + index file)."""
        path = Path(path)
        problem = path_problem(path)
        if problem is not None:
            raise InputError(problem, path, patient)
        name = str(path.resolve())
        try:
            signature = _stat_signature(path)
            memo = self._hashes.get(name)
            if memo is not None and memo["stat"] == signature:
                return memo["sha256"]
            digest = content_hash(path)
        except OSError as err:
            raise InputError(f"cannot read: {err.strerror or err}", path, patient) from None
        self._hashes[name] = {"stat": signature, "sha256": digest}
        # Merge with what other processes wrote meanwhile, then replace atomically.
        merged = self._read_index()
        merged.update(self._hashes)
        self._hashes = merged
        write_json(self._index_path, merged)
        return digest

    # ---- entries

    def _entry(self, stem: str) -> tuple[Path, Path]:
        return self.root / f"{stem}.npy", self.root / f"{stem}.json"

    @staticmethod
    def _load_meta(meta_path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _load_array(npy: Path) -> np.ndarray | None:
        try:
            mmap = "r" if npy.stat().st_size > _MMAP_BYTES else None
            return np.load(npy, mmap_mode=mmap, allow_pickle=False)
        except (OSError, ValueError):
            return None

    def _store(self, stem: str, array: np.ndarray, meta: dict[str, Any]) -> None:
        npy, meta_path = self._entry(stem)
        write_json(meta_path, meta)  # metadata first: the .npy marks a complete entry
        with atomic_path(npy) as tmp, tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    def _image_entry(
        self, path: Path, patient: str | None
    ) -> tuple[str, dict[str, Any], np.ndarray | None]:
        """(image hash, entry metadata, array if just computed), computing the entry if absent."""
        digest = self.content_hash(path, patient)
        stem = f"img-{digest}"
        npy, meta_path = self._entry(stem)
        if npy.exists():
            meta = self._load_meta(meta_path)
            if meta is not None and _current(meta) and _read_as_now(meta, path):
                return digest, meta, None
        scan = prepare_scan(path, self.cfg, patient)
        array = scan.array
        meta = {
            "kind": "image",
            "source": str(path),
            "sha256": digest,
            "settings": _settings(self.cfg),
            "reader": READER_VERSION,
            **cache_meta(scan),
        }
        self._store(stem, array, meta)
        return digest, meta, array

    def image(self, path: str | Path, patient: str | None = None) -> np.ndarray:
        """Canonical image ``(z, y, x)`` float32 in clipped HU (read-only memmap if > 64 MB)."""
        path = Path(path)
        digest, _, array = self._image_entry(path, patient)
        if array is not None:
            return array
        loaded = self._load_array(self._entry(f"img-{digest}")[0])
        if loaded is None:  # vanished or damaged meanwhile: rebuild it
            self._entry(f"img-{digest}")[0].unlink(missing_ok=True)
            _, _, array = self._image_entry(path, patient)
            assert array is not None
            return array
        return loaded

    def grid(self, path: str | Path, patient: str | None = None) -> Grid:
        """Canonical grid of the image at ``path`` (from its cache entry)."""
        _, meta, _ = self._image_entry(Path(path), patient)
        return Grid.from_dict(meta["grid"])

    def calibration(
        self, path: str | Path, patient: str | None = None
    ) -> tuple[Calibration, float]:
        """The intensity calibration of the image at ``path`` (of the file's own values)
        and the offset added to them (from its cache entry)."""
        _, meta, _ = self._image_entry(Path(path), patient)
        return Calibration.from_dict(meta["calibration"]), float(meta["hu_offset"])

    def source_grid(self, path: str | Path, patient: str | None = None) -> Grid:
        """Original geometry and size of the image at ``path`` (from its cache entry)."""
        _, meta, _ = self._image_entry(Path(path), patient)
        return Grid.from_dict(meta["source_geometry"])

    def mask(
        self, mask_path: str | Path, image_path: str | Path, patient: str | None = None
    ) -> np.ndarray:
        """Canonical mask ``(z, y, x)`` uint8 0/1 on the grid of ``image_path``'s image."""
        mask_path, image_path = Path(mask_path), Path(image_path)
        image_digest, meta, _ = self._image_entry(image_path, patient)
        mask_digest = self.content_hash(mask_path, patient)
        stem = "mask-" + hashlib.sha256(f"{mask_digest}:{image_digest}".encode()).hexdigest()
        npy, meta_path = self._entry(stem)
        entry = self._load_meta(meta_path) if npy.exists() else None
        # on the image's grid as it is now (its entry may have been remade), read as now
        if (
            entry is not None
            and entry.get("grid") == meta["grid"]
            and _read_as_now(entry, mask_path)
        ):
            loaded = self._load_array(npy)
            if loaded is not None:
                return loaded
        source = Grid.from_dict(meta["source_geometry"])
        grid = Grid.from_dict(meta["grid"])
        volume = io.read_mask(mask_path, source.geometry, source.shape_zyx, patient)
        array = resample_mask(to_sitk(volume.array, source.geometry), grid)
        voxel_mm3 = float(np.prod(source.geometry.spacing))
        grid_mm3 = float(np.prod(grid.geometry.spacing))
        self._store(
            stem,
            array,
            {
                "kind": "mask",
                "source": str(mask_path),
                "image": str(image_path),
                "sha256": mask_digest,
                "image_sha256": image_digest,
                "reader": READER_VERSION,
                "grid": grid.to_dict(),
                "source_foreground_mm3": float(np.count_nonzero(volume.array)) * voxel_mm3,
                "foreground_mm3": float(np.count_nonzero(array)) * grid_mm3,
                "settings": _settings(self.cfg),
            },
        )
        return array

    def mask_info(
        self, mask_path: str | Path, image_path: str | Path, patient: str | None = None
    ) -> dict[str, Any]:
        """The metadata of a mask's cache entry (made if absent): ``foreground_mm3`` on the
        canonical grid, ``source_foreground_mm3`` in the file, grid, hashes."""
        mask_path, image_path = Path(mask_path), Path(image_path)
        self.mask(mask_path, image_path, patient)
        image_digest = self.content_hash(image_path, patient)
        mask_digest = self.content_hash(mask_path, patient)
        stem = "mask-" + hashlib.sha256(f"{mask_digest}:{image_digest}".encode()).hexdigest()
        meta = self._load_meta(self._entry(stem)[1])
        if meta is None:  # removed meanwhile: what the array says
            array = self.mask(mask_path, image_path, patient)
            grid_mm3 = float(np.prod(self.grid(image_path, patient).geometry.spacing))
            fg = float(np.count_nonzero(array)) * grid_mm3
            return {"foreground_mm3": fg, "source_foreground_mm3": fg}
        return meta


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class Normalizer:
    """Per-domain z-score (paper §4): ``(x - mean) / std`` with statistics of a training split."""

    mean: float
    std: float

    @classmethod
    def fit(cls, arrays: Iterable[np.ndarray]) -> Normalizer:
        """Mean and (population) std over ALL voxels of ``arrays``, streamed in float64.

        Arrays are never concatenated; per-chunk statistics are merged with Chan et al.'s
        pairwise update, which stays accurate where sum-of-squares would cancel.
        """
        n, mean, m2 = 0, 0.0, 0.0
        for array in arrays:
            flat = np.asarray(array).reshape(-1)
            for start in range(0, flat.size, 4 * _CHUNK):
                chunk = flat[start : start + 4 * _CHUNK].astype(np.float64)
                k = chunk.size
                if k == 0:
                    continue
                c_mean = float(chunk.mean())
                c_m2 = float(np.square(chunk - c_mean).sum())
                total = n + k
                delta = c_mean - mean
                mean += delta * k / total
                m2 += c_m2 + delta * delta * n * k / total
                n = total
        if n == 0:
            raise ValueError("Normalizer.fit needs at least one non-empty array")
        return cls(float(mean), float(math.sqrt(m2 / n)))

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """``(array - mean) / std`` as a new float32 array (std floored at 1e-6)."""
        scale = np.float32(1.0 / max(self.std, 1e-6))
        out = np.asarray(array, dtype=np.float32) - np.float32(self.mean)
        out *= scale
        return out

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        return cls(float(data["mean"]), float(data["std"]))


def fit_normalizers(
    cache: PreprocessCache, domains: dict[str, list[Path]], check: bool = True
) -> dict[str, Normalizer]:
    """One ``Normalizer`` per domain, e.g. ``{"weak": [train images], "strong": [...]}``.

    ``check``: first check each domain's intensity calibration (``check_calibration``,
    naming files; a caller that checked its sets with patient ids passes False).
    """
    if check:
        check_calibration(cache, {n: [(None, Path(p)) for p in ps] for n, ps in domains.items()})
    return {
        name: Normalizer.fit(cache.image(Path(p)) for p in paths) for name, paths in domains.items()
    }


def save_normalizers(path: str | Path, normalizers: dict[str, Normalizer]) -> None:
    """Write ``{domain: {"mean", "std"}}`` as JSON, atomically."""
    write_json(path, {name: n.to_dict() for name, n in normalizers.items()})


def load_normalizers(path: str | Path) -> dict[str, Normalizer]:
    """Read what ``save_normalizers`` wrote.

    Raises:
        InputError: missing or malformed file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return {str(name): Normalizer.from_dict(v) for name, v in data.items()}
    except OSError as err:
        raise InputError(f"cannot read normalisation file: {err.strerror}", path) from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"malformed normalisation file: {err}", path) from None
