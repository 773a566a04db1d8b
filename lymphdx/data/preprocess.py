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

Cache layout (``PreprocessCache``)::

    cache_dir/
      hashes.json                  content-hash memo: resolved path -> stat signature + sha256
      <settings_key>/
        img-<sha256(image)>.npy    (z, y, x) float32 canonical image
        img-<sha256(image)>.json   grid, source geometry and size, settings
        mask-<sha256(mask hash + image hash)>.npy / .json   (z, y, x) uint8 canonical mask

Everything is written atomically (temporary name + rename), so concurrent writers are
last-writer-wins and a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from lymphdx.config import DataConfig
from lymphdx.data import io
from lymphdx.data.io import Geometry
from lymphdx.errors import InputError
from lymphdx.fileutil import atomic_path, write_json

__all__ = [
    "PREPROCESS_VERSION",
    "Grid",
    "canonical_grid",
    "check_coverage",
    "MAX_STRETCH",
    "resample_image",
    "resample_mask",
    "preprocess_image",
    "to_original",
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

_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_MMAP_BYTES = 64 * 2**20  # cached arrays larger than this are memory-mapped read-only
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """A canonical sampling grid: ``geometry`` (identity direction) and ``size_xyz`` voxels."""

    geometry: Geometry
    size_xyz: tuple[int, int, int]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)`` of data on this grid."""
        x, y, z = self.size_xyz
        return (z, y, x)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (lists of floats/ints)."""
        return {
            "spacing": list(self.geometry.spacing),
            "origin": list(self.geometry.origin),
            "direction": list(self.geometry.direction),
            "size_xyz": list(self.size_xyz),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Grid:
        """Inverse of ``to_dict``."""
        geometry = Geometry(
            tuple(float(v) for v in data["spacing"]),
            tuple(float(v) for v in data["origin"]),
            tuple(float(v) for v in data["direction"]),
        )
        size = tuple(int(v) for v in data["size_xyz"])
        return cls(geometry, size)  # type: ignore[arg-type]


def canonical_grid(
    image_geometry: Geometry,
    image_size_xyz: tuple[int, int, int] | tuple[int, ...],
    cfg: DataConfig,
) -> Grid:
    """The canonical grid of an image with ``image_geometry`` and ``image_size_xyz`` voxels.

    Identity direction, ``cfg.shape`` voxels, centred on the centre of the input's field of
    view; spacing ``cfg.spacing`` (``fit="crop"``) or the input's world bounding-box extent
    divided by ``cfg.shape`` (``fit="resize"``).
    """
    size = np.asarray(image_size_xyz, dtype=np.float64)
    spacing = np.asarray(image_geometry.spacing, dtype=np.float64)
    direction = np.asarray(image_geometry.direction, dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image_geometry.origin, dtype=np.float64)
    shape = np.asarray(cfg.shape, dtype=np.float64)
    # Centre of the field of view = world position of the continuous index (size - 1) / 2.
    centre = origin + direction @ (spacing * (size - 1.0) / 2.0)
    if cfg.fit == "crop":
        out_spacing = np.asarray(cfg.spacing, dtype=np.float64)
    else:
        # World-axis bounding box of the voxel-edge box (exact for axis-aligned scans).
        extent = np.abs(direction) @ (spacing * size)
        out_spacing = extent / shape
    out_origin = centre - out_spacing * (shape - 1.0) / 2.0
    geometry = Geometry(
        tuple(float(v) for v in out_spacing),
        tuple(float(v) for v in out_origin),
        _IDENTITY,
    )
    return Grid(geometry, tuple(int(v) for v in cfg.shape))  # type: ignore[arg-type]


#: With ``fit="resize"``, the canonical grid may be at most this many times finer than the
#: scan along an axis; a scan with fewer voxels is stretched into interpolation, not anatomy.
MAX_STRETCH = 16


def check_coverage(
    geometry: Geometry,
    size_xyz: tuple[int, ...],
    cfg: DataConfig,
    path: str | Path | None = None,
    patient: str | None = None,
) -> None:
    """Refuse a scan far too small for the canonical grid (a localizer, a crop, a bad header).

    ``fit="crop"``: the scan must span at least one grid voxel (``cfg.spacing``) along each
    world axis; a thinner scan would be a slab of at most one slice of the model's input,
    the rest padding. ``fit="resize"``: the grid may be at most ``MAX_STRETCH`` times finer
    than the scan along each axis.

    Raises:
        InputError: naming the file, the patient, the scan's extent and the grid's.
    """
    size = np.asarray(size_xyz, dtype=np.float64)
    direction = np.abs(np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3))
    extent = direction @ (np.asarray(geometry.spacing, dtype=np.float64) * size)  # world mm
    mm = " x ".join(f"{v:.3g}" for v in extent)
    if cfg.fit == "crop":
        grid = np.asarray(cfg.spacing, dtype=np.float64)
        short = [axis for axis, e, g in zip("xyz", extent, grid, strict=True) if e < g]
        if short:
            raise InputError(
                f"the scan is far too small for the model: it spans {mm} mm (x, y, z), less "
                f"than one voxel of the model's input grid ({' x '.join(map(str, cfg.spacing))}"
                f" mm, data.spacing) along {', '.join(short)}; is it a localizer, a crop or "
                "a file with a wrong voxel size?",
                path,
                patient,
            )
        return
    voxels = direction @ size  # voxels along each world axis (exact when axis-aligned)
    stretch = np.asarray(cfg.shape, dtype=np.float64) / np.maximum(voxels, 1e-9)
    short = [axis for axis, s in zip("xyz", stretch, strict=True) if s > MAX_STRETCH]
    if short:
        have = " x ".join(f"{v:.3g}" for v in voxels)
        raise InputError(
            f"the scan is far too small for the model: it has {have} voxels (x, y, z), and "
            f"resizing it onto the model's input ({' x '.join(map(str, cfg.shape))}, "
            f"data.shape) would stretch it more than {MAX_STRETCH} times along "
            f"{', '.join(short)}; is it a localizer or a crop?",
            path,
            patient,
        )


def _resample(
    image: sitk.Image, grid: Grid, interpolator: int, default: float, pixel_type: int
) -> np.ndarray:
    g = grid.geometry
    out = sitk.Resample(
        image,
        [int(v) for v in grid.size_xyz],
        sitk.Transform(),
        interpolator,
        g.origin,
        g.spacing,
        g.direction,
        float(default),
        pixel_type,
    )
    return sitk.GetArrayFromImage(out)


def resample_image(image: sitk.Image, grid: Grid, cfg: DataConfig) -> np.ndarray:
    """Image → ``grid.shape_zyx`` float32 array in HU, linear, outside = low, clipped to window."""
    lo, hi = (float(v) for v in cfg.hu_window)
    array = _resample(image, grid, sitk.sitkLinear, lo, sitk.sitkFloat32)
    array = np.asarray(array, dtype=np.float32)
    np.clip(array, lo, hi, out=array)
    return array


def resample_mask(mask: sitk.Image, grid: Grid) -> np.ndarray:
    """Mask (nonzero = node; instance ids allowed) → ``grid.shape_zyx`` uint8 0/1, nearest."""
    pixel_type = mask.GetPixelID()
    array = _resample(mask, grid, sitk.sitkNearestNeighbor, 0.0, pixel_type)
    return (array != 0).astype(np.uint8)


def preprocess_image(image: sitk.Image, cfg: DataConfig) -> tuple[np.ndarray, Grid]:
    """Canonical grid of ``image`` and the image resampled onto it (``(z, y, x)`` float32)."""
    grid = canonical_grid(Geometry.of(image), tuple(image.GetSize()), cfg)
    return resample_image(image, grid, cfg), grid


def to_original(
    array_zyx: np.ndarray, grid: Grid, reference: sitk.Image, nearest: bool = False
) -> sitk.Image:
    """Map a ``grid.shape_zyx`` array (e.g. ROI probabilities) back onto ``reference``'s grid.

    Linear interpolation (float32 output) by default; ``nearest=True`` keeps the input's
    dtype (use it for label maps). Outside the canonical grid → 0. The result has exactly
    ``reference``'s size, spacing, origin and direction.
    """
    array = np.asarray(array_zyx)
    if tuple(array.shape) != grid.shape_zyx:
        raise ValueError(f"array shape {array.shape} (z, y, x) differs from grid {grid.shape_zyx}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not nearest:
        array = array.astype(np.float32, copy=False)
    source = io.to_sitk(array, grid.geometry)
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0)


# --------------------------------------------------------------------------- keys and hashing


def _settings(cfg: DataConfig) -> dict[str, Any]:
    return {
        "version": PREPROCESS_VERSION,
        "spacing": [float(v) for v in cfg.spacing],
        "shape": [int(v) for v in cfg.shape],
        "fit": cfg.fit,
        "hu_window": [float(v) for v in cfg.hu_window],
    }


def settings_key(cfg: DataConfig) -> str:
    """Short hash of everything that changes preprocessing (and ``PREPROCESS_VERSION``)."""
    text = json.dumps(_settings(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _header_data_file(path: Path) -> Path | None:
    """The separate data file named in an ``.mhd`` / ``.nhdr`` header, if any."""
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
    data file pair (``.mhd``/``.nhdr``), or the file itself."""
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
        self.root.mkdir(parents=True, exist_ok=True)
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
        if not path.exists():
            raise InputError("file does not exist", path, patient)
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
            if meta is not None:
                return digest, meta, None
        volume = io.read_volume(path, patient)
        check_coverage(volume.geometry, volume.shape_xyz, self.cfg, path, patient)
        grid = canonical_grid(volume.geometry, volume.shape_xyz, self.cfg)
        array = resample_image(io.to_sitk(volume.array, volume.geometry), grid, self.cfg)
        meta = {
            "kind": "image",
            "source": str(path),
            "sha256": digest,
            "source_geometry": Grid(volume.geometry, volume.shape_xyz).to_dict(),
            "grid": grid.to_dict(),
            "settings": _settings(self.cfg),
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
        if npy.exists() and meta_path.exists():
            loaded = self._load_array(npy)
            if loaded is not None:
                return loaded
        source = Grid.from_dict(meta["source_geometry"])
        grid = Grid.from_dict(meta["grid"])
        volume = io.read_mask(mask_path, source.geometry, source.shape_zyx, patient)
        array = resample_mask(io.to_sitk(volume.array, source.geometry), grid)
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
                "grid": grid.to_dict(),
                "source_foreground_mm3": float(np.count_nonzero(volume.array)) * voxel_mm3,
                "foreground_mm3": float(np.count_nonzero(array)) * grid_mm3,
                "settings": _settings(self.cfg),
            },
        )
        return array


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
    cache: PreprocessCache, domains: dict[str, list[Path]]
) -> dict[str, Normalizer]:
    """One ``Normalizer`` per domain, e.g. ``{"weak": [train images], "strong": [...]}``."""
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
