"""The two synthetic hospitals' acquisition and population parameters, ``shift`` and
``resolution``.

``HOSPITALS`` holds hospital A (the weak set) and B (the strong set); ``shifted_hospital``
moves B's acquisition along the line from A's (``SynthSpec.shift``); ``Resolution``
(``SynthSpec.resolution``, ``lymphdx synth --resolution``) is the grid a scan is written
on, the hospital's own grid (``Hospital.spacing``, ``Hospital.size``) refined with the
field of view kept. See ``lymphdx.data.synthetic`` for the phantom as a whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "HOSPITALS",
    "Hospital",
    "MAX_VOXELS",
    "MIN_SPACING_MM",
    "RESOLUTIONS",
    "Resolution",
    "SHIFT_FIELDS",
    "SHIFT_FLOORS",
    "SHIFT_HU_FIELDS",
    "SHIFT_HU_RANGE",
    "hospital_by_name",
    "resolution_by_name",
    "shifted_hospital",
]


@dataclass(frozen=True)
class Hospital:
    """Acquisition and population parameters of one synthetic hospital.

    ``spacing`` and ``size`` are ``(x, y, z)``: the hospital's reference grid, on which
    the anatomy and the nodes are decided whatever the ``Resolution``. HU values are
    ``(mean, sd between patients)`` before calibration (``gain * hu + offset``). Noise,
    texture and PSF sigmas are in voxels of the reference grid (see ``Resolution`` for how
    they carry over to a finer grid).
    """

    name: str
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]
    gain: float
    offset: float
    noise_sd: float
    noise_sigma: float
    texture_gain: float
    texture_sigma: float
    psf_sigma: float
    aorta_hu: tuple[float, float]
    vein_hu: tuple[float, float]
    liver_hu: tuple[float, float]
    spleen_hu: tuple[float, float]
    kidney_hu: tuple[float, float]
    bowel_wall_hu: tuple[float, float]
    n_nodes: tuple[int, int]  # inclusive range of nodes per scan
    p_metastatic: float  # used when make_scan(metastatic=None)


# Hospital A (the weak set, like the paper's RAH): portal-venous phase, smooth noise.
# Hospital B (the strong set, like TCIA CT Lymph Nodes): arterial phase, finer noise.
# One row a parameter, the two hospitals side by side: (A, B).
_SIDE_BY_SIDE: dict[str, tuple[object, object]] = {
    "spacing": ((4.0, 4.0, 5.0), (3.5, 3.5, 4.0)),
    "size": ((80, 80, 48), (96, 96, 56)),
    "gain": (1.0, 1.05),
    "offset": (0.0, 15.0),
    "noise_sd": (12.0, 25.0),
    "noise_sigma": (1.0, 0.5),
    "texture_gain": (1.0, 1.3),
    "texture_sigma": (2.5, 1.5),
    "psf_sigma": (0.5, 0.45),
    "aorta_hu": ((150.0, 15.0), (250.0, 25.0)),
    "vein_hu": ((135.0, 12.0), (85.0, 12.0)),
    "liver_hu": ((110.0, 10.0), (70.0, 8.0)),
    "spleen_hu": ((120.0, 10.0), (115.0, 15.0)),
    "kidney_hu": ((165.0, 15.0), (190.0, 20.0)),
    "bowel_wall_hu": ((55.0, 6.0), (45.0, 6.0)),
    "n_nodes": ((3, 9), (5, 9)),
    "p_metastatic": (57 / 123, 0.4),
}
HOSPITALS: dict[str, Hospital] = {
    name: Hospital(name=name, **{k: v[i] for k, v in _SIDE_BY_SIDE.items()})  # type: ignore[arg-type]
    for i, name in enumerate("AB")
}
_ALIASES = {"A": "A", "WEAK": "A", "B": "B", "STRONG": "B"}

# SynthSpec.shift: B' = A + shift * (B - A) for these acquisition parameters ...
SHIFT_FIELDS = (
    "gain",
    "offset",
    "noise_sd",
    "noise_sigma",
    "texture_gain",
    "texture_sigma",
    "psf_sigma",
)
# ... for the means of these contrast-phase HU (mean, sd) pairs (the sd stays B's) ...
SHIFT_HU_FIELDS = ("aorta_hu", "vein_hu", "liver_hu", "spleen_hu", "kidney_hu", "bowel_wall_hu")
# ... and for the voxel spacing (B's field of view in mm is kept), clamped to valid values:
SHIFT_FLOORS = {
    "gain": 0.05,
    "noise_sd": 1.0,  # HU
    "noise_sigma": 0.25,  # voxels (0.25 is already practically white noise)
    "texture_gain": 0.0,
    "texture_sigma": 0.25,
    "psf_sigma": 0.25,
}
SHIFT_HU_RANGE = (20.0, 1000.0)  # enhanced soft tissue / blood: above water, below bone
MIN_SPACING_MM = 0.5


def hospital_by_name(name: str) -> Hospital:
    """Hospital ``name``: ``"A"``/``"weak"`` or ``"B"``/``"strong"`` (any case)."""
    key = _ALIASES.get(str(name).upper())
    if key is None:
        raise ValueError(f"unknown hospital {name!r}; expected one of A, B, weak, strong")
    return HOSPITALS[key]


def _lerp(a: float, b: float, t: float) -> float:
    """``a + t * (b - a)``, written so that t = 0 gives exactly ``a`` and t = 1 exactly ``b``."""
    return (1.0 - t) * a + t * b


def shifted_hospital(shift: float) -> Hospital:
    """Hospital B with its acquisition moved to ``A + shift * (B - A)``.

    Applies to ``SHIFT_FIELDS``, the means of ``SHIFT_HU_FIELDS`` (their between-patient sd
    stays B's) and the voxel spacing; values are clamped to ``SHIFT_FLOORS``,
    ``SHIFT_HU_RANGE`` and ``MIN_SPACING_MM``. ``size`` is chosen so that B's field of view
    in mm stays (to the nearest voxel) as it is. The population (``n_nodes``,
    ``p_metastatic``) stays B's. ``shift=1`` returns exactly ``HOSPITALS["B"]``.
    """
    a, b = HOSPITALS["A"], HOSPITALS["B"]
    changes: dict = {}
    for f in SHIFT_FIELDS:
        v = _lerp(getattr(a, f), getattr(b, f), shift)
        changes[f] = max(v, SHIFT_FLOORS[f]) if f in SHIFT_FLOORS else v
    for f in SHIFT_HU_FIELDS:
        (ma, _), (mb, sd) = getattr(a, f), getattr(b, f)
        changes[f] = (float(np.clip(_lerp(ma, mb, shift), *SHIFT_HU_RANGE)), sd)
    spacing = tuple(
        max(_lerp(sa, sb, shift), MIN_SPACING_MM)
        for sa, sb in zip(a.spacing, b.spacing, strict=True)
    )
    size = tuple(
        max(1, round(n * sb / s)) for n, sb, s in zip(b.size, b.spacing, spacing, strict=True)
    )
    return replace(b, spacing=spacing, size=size, **changes)


# --------------------------------------------------------------------------- resolution

MAX_VOXELS = 2**27  # one scan's grid (134 M voxels, about 5 GiB to make; 512 x 512 x 512)


@dataclass(frozen=True)
class Resolution:
    """The grid a scan is written on: hospital A's in-plane and slice spacing (mm).

    Every hospital's reference grid (``Hospital.spacing``) is refined by the same factors
    as A's, ``(inplane_mm, inplane_mm, slice_mm) / HOSPITALS["A"].spacing``, so B keeps its
    spacing relative to A's (7/8 in-plane, 4/5 across slices; a shifted B its own), and
    the size follows so that the field of view in mm stays (to the nearest voxel). The
    anatomy and the nodes are decided on the reference grid and drawn on this one, so a
    patient is the same in mm at every resolution.

    What a finer grid does to the intensities (``lymphdx.data.synthetic.make_scan``): the
    tissue and node texture and the noise keep their correlation lengths in mm (their
    sigmas are converted per axis), the noise its sd per voxel; the PSF and the
    partial-volume edge stay in voxels, as a scanner's reconstruction kernel follows the
    reconstruction grid (at 0.7-0.8 mm pixels an in-plane FWHM of about 1 mm).
    """

    name: str
    inplane_mm: float
    slice_mm: float

    def __post_init__(self) -> None:
        a = HOSPITALS["A"].spacing
        for what, v, hi in (("in-plane", self.inplane_mm, a[0]), ("slice", self.slice_mm, a[2])):
            if not (math.isfinite(v) and MIN_SPACING_MM <= v <= hi):
                raise ValueError(
                    f"resolution's {what} spacing must be in [{MIN_SPACING_MM:g}, {hi:g}] mm "
                    f"(hospital A's default grid is the coarsest), got {v:g}"
                )

    @property
    def is_default(self) -> bool:
        """True for the hospitals' own grids (today's phantom, byte for byte)."""
        a = HOSPITALS["A"].spacing
        return (self.inplane_mm, self.slice_mm) == (a[0], a[2])

    def grid(self, hospital: Hospital) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
        """``(spacing, size)`` ``(x, y, z)`` of ``hospital`` at this resolution."""
        if self.is_default:
            return hospital.spacing, hospital.size
        a = HOSPITALS["A"].spacing
        target = (self.inplane_mm, self.inplane_mm, self.slice_mm)
        spacing = tuple(
            round(s * t / r, 6) for s, t, r in zip(hospital.spacing, target, a, strict=True)
        )
        size = tuple(
            max(1, round(n * s / t))
            for n, s, t in zip(hospital.size, hospital.spacing, spacing, strict=True)
        )
        return spacing, size  # type: ignore[return-value]

    def check(self, hospital: Hospital) -> None:
        """Raise ValueError when ``hospital``'s grid at this resolution exceeds ``MAX_VOXELS``."""
        spacing, size = self.grid(hospital)
        n = math.prod(size)
        if n > MAX_VOXELS:
            raise ValueError(
                f"resolution {self.name} is too fine: hospital {hospital.name}'s grid would be "
                f"{size[0]} x {size[1]} x {size[2]} voxels of {spacing} mm ({n / 1e6:.0f} M), "
                f"over {MAX_VOXELS / 1e6:.0f} M; choose a coarser resolution (or a smaller shift)"
            )


RESOLUTIONS: dict[str, Resolution] = {
    # today's grids: A 4 x 4 x 5 mm (80 x 80 x 48), B 3.5 x 3.5 x 4 mm (96 x 96 x 56)
    "default": Resolution("default", 4.0, 5.0),
    # abdominal CT as hospitals reconstruct it: A 0.8 x 0.8 x 2.5 mm (400 x 400 x 96),
    # B 0.7 x 0.7 x 2 mm (480 x 480 x 112)
    "clinical": Resolution("clinical", 0.8, 2.5),
}


def resolution_by_name(text: str | Resolution | None) -> Resolution:
    """``"default"``, ``"clinical"`` or ``"IN,SLICE"`` (hospital A's in-plane and slice
    spacing in mm, e.g. ``"1.5,2"``; B's follows, see ``Resolution``). ``None``: default."""
    if isinstance(text, Resolution):
        return text
    if text is None:
        return RESOLUTIONS["default"]
    key = str(text).strip().lower()
    if key in RESOLUTIONS:
        return RESOLUTIONS[key]
    parts = key.replace("x", ",").split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        inplane, slice_ = (float(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"resolution must be one of {', '.join(RESOLUTIONS)} or IN,SLICE (hospital A's "
            f"in-plane and slice spacing in mm, e.g. 1.5,2), got {text!r}"
        ) from None
    return Resolution(f"{inplane:g},{slice_:g}", inplane, slice_)
