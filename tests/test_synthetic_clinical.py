"""Tests of the phantom at clinical resolution and of its realistic nodes (issue 29, step 1):
``SynthSpec.resolution`` / ``--resolution`` and ``SynthSpec.phantom`` / ``--phantom``."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.data.synthetic import NODE_COLUMNS, SynthSpec, make_scan, patient_rng
from lymphdx.data.synthetic_anatomy import PhantomGrid, Tissue
from lymphdx.data.synthetic_hospitals import (
    HOSPITALS,
    MAX_VOXELS,
    Resolution,
    resolution_by_name,
    shifted_hospital,
)
from lymphdx.data.synthetic_nodes import Margin, rasterise_node, render_node
from lymphdx.data.synthetic_realistic import (
    BENIGN_LONG_MAX_MM,
    BENIGN_SHORT_AXIS_MM,
    draw_realistic_node,
)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ------------------------------------------------------------------ the default stays today's


def test_default_phantom_is_pinned() -> None:
    """The default phantom's arrays, byte for byte as before issue 29 (hashes taken from
    the code at a377995, before --resolution and --phantom existed)."""
    a = make_scan(patient_rng(0, "weak", 4), "A", True)
    b = make_scan(patient_rng(0, "strong", 2), "B", None)
    assert _sha(a.hu) == "e2a0ee586fcb27326d09d6a96aed14e0d772653cba719a7233fbb3d42a116bc3"
    assert _sha(a.instances) == "3331d94824018e20c8a14d8d6929af663395889b02718a11cfd1cc510e7d6ab1"
    assert _sha(b.hu) == "dbb25fb316580e40faa4e6f253fccaf2a69d6b4d88bc14870dc2f71bd6e5f7ec"
    assert _sha(b.instances) == "254c25295d1d02e27c2959b6b1b2ac4b653c8068778c419054bf27024773a799"
    explicit = make_scan(
        patient_rng(0, "weak", 4), "A", True, phantom="scaled", resolution="default"
    )
    assert _sha(explicit.hu) == _sha(a.hu) and explicit.nodes == a.nodes


# ------------------------------------------------------------------ resolution


def test_resolution_grids_by_hand() -> None:
    clinical = resolution_by_name("clinical")
    assert clinical.grid(HOSPITALS["A"]) == ((0.8, 0.8, 2.5), (400, 400, 96))
    assert clinical.grid(HOSPITALS["B"]) == ((0.7, 0.7, 2.0), (480, 480, 112))
    assert resolution_by_name("default").grid(HOSPITALS["B"]) == (
        HOSPITALS["B"].spacing,
        HOSPITALS["B"].size,
    )
    r = resolution_by_name(" 1.5, 2 ")
    assert r.name == "1.5,2" and resolution_by_name("1.5x2") == r
    # B keeps 7/8 (in-plane) and 4/5 (slices) of A's spacing; the field of view is kept
    assert r.grid(HOSPITALS["A"]) == ((1.5, 1.5, 2.0), (213, 213, 120))
    assert r.grid(HOSPITALS["B"]) == ((1.3125, 1.3125, 1.6), (256, 256, 140))
    # a shifted B moves with A's refinement: shift 2 puts B at 3 x 3 x 3 mm, so clinical
    # gives 0.6 x 0.6 x 1.5
    assert clinical.grid(shifted_hospital(2.0))[0] == (0.6, 0.6, 1.5)


@pytest.mark.parametrize("bad", ["fine", "1.5", "1,2,3", "0.4,2", "1,6", "nan,2", "5,2", ""])
def test_resolution_rejects_bad_values(bad: str) -> None:
    with pytest.raises(ValueError, match="resolution"):
        resolution_by_name(bad)


def test_resolution_too_many_voxels() -> None:
    with pytest.raises(ValueError, match="too fine"):
        SynthSpec(resolution="0.5,0.5")  # A: 640 x 640 x 480 voxels
    with pytest.raises(ValueError, match="too fine"):
        SynthSpec(resolution="clinical", shift=10.0)  # B at 0.1 x 0.1 x 0.25 mm
    spacing, size = resolution_by_name("clinical").grid(HOSPITALS["B"])
    assert np.prod(size) < MAX_VOXELS


@pytest.fixture(scope="module")
def pair() -> tuple:
    """One hospital-A patient at the default grid and at 2 x 2 x 2.5 mm."""
    coarse = make_scan(patient_rng(3, "weak", 1), "A", True)
    fine = make_scan(patient_rng(3, "weak", 1), "A", True, resolution="2,2.5")
    return coarse, fine


def _centre(scan) -> np.ndarray:
    g = scan.geometry
    return np.asarray(g.origin) + np.asarray(g.spacing) * (np.array(scan.hu.shape[::-1]) - 1) / 2


def test_resolution_keeps_field_of_view_and_nodes_in_mm(pair: tuple) -> None:
    coarse, fine = pair
    assert fine.geometry.spacing == (2.0, 2.0, 2.5) and fine.hu.shape == (96, 160, 160)
    fov = lambda s: np.asarray(s.geometry.spacing) * np.array(s.hu.shape[::-1])  # noqa: E731
    np.testing.assert_allclose(fov(fine), fov(coarse))  # 320 x 320 x 240 mm
    np.testing.assert_allclose(_centre(fine), _centre(coarse), atol=1e-6)
    assert [n.center_mm for n in fine.nodes] == [n.center_mm for n in coarse.nodes]
    assert [(n.diameter_mm, n.metastatic, n.axes_mm) for n in fine.nodes] == [
        (n.diameter_mm, n.metastatic, n.axes_mm) for n in coarse.nodes
    ]
    ijk = lambda s, c: tuple(  # noqa: E731
        np.rint((np.asarray(c) - s.geometry.origin) / s.geometry.spacing).astype(int)[::-1]
    )
    for n in fine.nodes:
        assert fine.instances[ijk(fine, n.center_mm)] == n.id
    assert set(np.unique(fine.instances)) == set(range(len(fine.nodes) + 1))
    # every node voxel lies in node fat on the fine grid too
    assert np.isin(fine.tissue[fine.instances > 0], Tissue.NODE_FAT).all()


def test_resolution_keeps_volumes_in_mm3(pair: tuple) -> None:
    """Node volumes against the ellipsoid's (pi/6 x the product of its axes): within 8 % on
    the 2 mm grid, within 35 % on the 4 x 4 x 5 mm one; the organs' volumes agree too."""
    coarse, fine = pair
    for scan, tol in ((fine, 0.08), (coarse, 0.35)):
        voxel = float(np.prod(scan.geometry.spacing))
        counts = np.bincount(scan.instances.ravel())
        for n in scan.nodes:
            truth = np.pi / 6 * float(np.prod(n.axes_mm))
            assert counts[n.id] * voxel == pytest.approx(truth, rel=tol), (n.id, tol)
    vc, vf = (float(np.prod(s.geometry.spacing)) for s in (coarse, fine))
    for label in (Tissue.LIVER, Tissue.KIDNEY, Tissue.SPLEEN, Tissue.ARTERY, Tissue.RETRO_FAT):
        a = np.count_nonzero(coarse.tissue == label) * vc
        b = np.count_nonzero(fine.tissue == label) * vf
        assert b == pytest.approx(a, rel=0.06), label


def test_noise_keeps_its_correlation_in_mm(pair: tuple) -> None:
    """Outside the body the image is -1000 HU + noise: its correlation at 4 mm (x) is that
    of a Gaussian-smoothed field of sigma 4 mm, exp(-4^2 / (4 * 4^2)) = 0.78, on both grids
    (kept in voxels it would be exp(-1) = 0.37 on the 2 mm grid)."""

    def corr(scan, lag: int) -> float:
        air = ndimage.binary_erosion(scan.tissue == Tissue.AIR, iterations=2)
        both = air[..., :-lag] & air[..., lag:]
        a, b = scan.hu[..., :-lag][both], scan.hu[..., lag:][both]
        return float(np.corrcoef(a, b)[0, 1])

    coarse, fine = pair
    assert corr(coarse, 1) == pytest.approx(0.78, abs=0.08)
    assert corr(fine, 2) == pytest.approx(corr(coarse, 1), abs=0.08)


def test_sigmas_in_voxels_by_hand() -> None:
    base = PhantomGrid.make((80, 80, 48), (4.0, 4.0, 5.0), (0, 0, 0))
    assert base.base_voxels(1.5) == 1.5  # the reference grid: the number itself
    fine = PhantomGrid.make((160, 160, 96), (2.0, 2.0, 2.5), (0, 0, 0), base_spacing=(4, 4, 5))
    assert fine.base_voxels(1.0) == (2.0, 2.0, 2.0)  # (z, y, x): 5 / 2.5, 4 / 2, 4 / 2
    assert fine.mm_voxels(5.0) == (2.0, 2.5, 2.5)


# ------------------------------------------------------------------ realistic nodes


def _draws(metastatic: bool, n: int = 400, scale: float = 1.0) -> list:
    rng = np.random.default_rng(11)
    return [draw_realistic_node(rng, metastatic, scale) for _ in range(n)]


def test_realistic_sizes_follow_the_drawn_distribution() -> None:
    ben, met = _draws(False), _draws(True)
    short = lambda ns: np.array([2 * n.semi[2] for n in ns])  # noqa: E731
    long = lambda ns: np.array([2 * n.semi[0] for n in ns])  # noqa: E731
    sb, sm, lb = short(ben), short(met), long(ben)
    lo, hi, a, b = BENIGN_SHORT_AXIS_MM
    assert np.median(sb) == pytest.approx(lo + (hi - lo) * stats.beta.median(a, b), abs=0.4)
    assert np.median(sb) < 10 and np.mean(sb < 10) > 0.95  # benign: mostly under 10 mm
    assert sb.min() >= 3.0 and lb.max() <= BENIGN_LONG_MAX_MM + 1e-9
    assert np.median(sm) > np.median(sb) + 3  # metastatic larger on average ...
    assert 0.3 < np.mean(sm < 10) < 0.6  # ... but many are under 10 mm: sizes overlap
    rb = np.array([n.roundness for n in ben])
    rm = np.array([n.roundness for n in met])
    assert rm.mean() > rb.mean() + 0.2 and rm.min() < rb.max()  # rounder
    assert np.mean(rm > 0.5) > 0.95  # long-to-short axis ratio < 2
    for n in ben + met:  # the axes are (long, middle, short); diameter = equal volume
        assert n.semi[0] >= n.semi[1] >= n.semi[2] > 0
        assert n.diameter == pytest.approx(float(np.prod(2 * n.semi)) ** (1 / 3))
        assert n.roundness == pytest.approx(n.semi[2] / n.semi[0])
    # malignancy signs: necrosis only in metastatic nodes, more in large ones
    assert not any(n.necrotic for n in ben) and not any(n.fatty_hilum for n in met)
    nec = np.array([n.necrotic for n in met])
    assert 0.15 < nec.mean() < 0.4 and sm[nec].mean() > sm[~nec].mean()
    assert np.mean([n.heterogeneous for n in met]) > 0.45
    assert np.mean([n.heterogeneous for n in ben]) < 0.1
    irr_m = [n.margin_irregularity for n in met]
    irr_b = [n.margin_irregularity for n in ben]
    assert 0.4 < np.mean(np.array(irr_m) > 0) < 0.6 and np.mean(np.array(irr_b) > 0) < 0.1
    assert max(irr_b) < min(i for i in irr_m if i > 0)  # benign margins only mildly irregular


def test_realistic_node_scale_multiplies_lengths() -> None:
    full, half = _draws(True, 50), _draws(True, 50, scale=0.5)
    for a, b in zip(full, half, strict=True):
        np.testing.assert_allclose(b.semi, 0.5 * a.semi)
        assert (a.necrotic, a.heterogeneous) == (b.necrotic, b.heterogeneous)


def _isolated(
    nd, spacing_mm: float = 0.5, n: int = 72, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One node alone in fat (-100 HU) on an isotropic grid: (hu, mask), no PSF or noise."""
    grid = PhantomGrid.make((n, n, n), (spacing_mm,) * 3, (0.0, 0.0, 0.0))
    labels = np.full(grid.shape, Tissue.RETRO_FAT, np.uint8)
    mask = np.zeros(grid.shape, np.uint16)
    rasterise_node(grid, labels, mask, nd, (0.0, 0.0, 0.0), 1)
    hu = np.full(grid.shape, -100.0, np.float32)
    render_node(np.random.default_rng(seed), grid, hu, (0.0, 0.0, 0.0), nd, 1.0)
    return hu, mask == 1


def test_irregular_margin_perturbs_the_surface() -> None:
    """A sphere of radius 8 mm with a margin of amplitude 0.2: the distances of its
    boundary voxels from the centre vary by about 20 % (a smooth sphere's by ~2 %), and its
    volume stays that of the sphere within 15 %."""
    rng = np.random.default_rng(5)
    nd = draw_realistic_node(rng, False)
    nd.semi = np.array([8.0, 8.0, 8.0])
    nd.heterogeneous = nd.necrotic = nd.fatty_hilum = False

    def boundary_spread(mask: np.ndarray) -> tuple[float, float]:
        edge = mask & ~ndimage.binary_erosion(mask)
        z, y, x = np.nonzero(edge)
        r = 0.5 * np.sqrt((x - 35.5) ** 2 + (y - 35.5) ** 2 + (z - 35.5) ** 2)
        return float(r.std() / r.mean()), float(mask.sum() * 0.125)

    nd.margin = None
    smooth, volume = boundary_spread(_isolated(nd)[1])
    assert smooth < 0.04 and volume == pytest.approx(4 / 3 * np.pi * 8**3, rel=0.03)
    nd.margin = Margin.draw(rng, 0.2)
    rough, volume = boundary_spread(_isolated(nd)[1])
    assert 0.12 < rough < 0.3
    assert volume == pytest.approx(4 / 3 * np.pi * 8**3, rel=0.15)


def test_realistic_mean_attenuation_differs_little() -> None:
    """At equal size (a 9 x 7 x 6 mm node, 0.5 mm voxels, no PSF or noise), metastatic and
    benign nodes of the realistic population differ by < 3 HU in mean attenuation over their
    masks (measured: +1.3 HU; necrosis lowers metastatic nodes, a fatty hilum benign ones,
    the enhancement is drawn alike). Whole scans show more, through size (partial volume of
    small nodes): benchmarks/node_sizes.py prints it."""

    def mean_hu(metastatic: bool) -> float:
        values = []
        for i, nd in enumerate(_draws(metastatic, 150)):
            nd.semi = np.array([4.5, 3.5, 3.0])
            hu, mask = _isolated(nd, n=40, seed=i + 1000 * metastatic)  # texture: own seeds
            values.append(float(hu[mask].mean()))
        return float(np.mean(values))

    assert abs(mean_hu(True) - mean_hu(False)) < 3.0


def test_realistic_scans_nodes_small_for_the_quick_grid() -> None:
    """Realistic nodes in whole scans: benign short axis mostly under 10 mm, and a median
    equal-volume diameter under 2 voxels of the quick grid (5 x 5 x 6 mm)."""
    nodes = [
        n
        for i in range(6)
        for h in ("A", "B")
        for n in make_scan(patient_rng(2, "real", i), h, bool(i % 2), phantom="realistic").nodes
    ]
    ben = np.array([n.axes_mm[2] for n in nodes if not n.metastatic])
    assert np.median(ben) < 8 and np.mean(ben < 10) > 0.9
    quick_voxel = (5 * 5 * 6) ** (1 / 3)
    assert np.median([n.diameter_mm for n in nodes]) / quick_voxel < 2.0


# ------------------------------------------------------------------ command line and files


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_synth_cli_resolution_and_phantom(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["synth", "--out", str(out), "--n-weak", "1", "--n-pos", "1", "--n-strong", "1"]
    result = CliRunner().invoke(
        app, [*args, "--resolution", "3,4", "--phantom", "realistic", "--jobs", "1"]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "synth.json").read_text())
    assert meta["spec"]["resolution"] == "3,4" and meta["spec"]["phantom"] == "realistic"
    assert meta["summary"]["resolution"] == "3,4" and meta["summary"]["phantom"] == "realistic"
    assert meta["grids"]["weak"] == {"spacing": [3.0, 3.0, 4.0], "size": [107, 107, 60]}
    assert meta["grids"]["strong"] == {"spacing": [2.625, 2.625, 3.2], "size": [128, 128, 70]}
    assert meta["hospitals"]["weak"]["spacing"] == [4.0, 4.0, 5.0]  # the reference grid
    img = nib.load(out / "strong/images/S0001.nii.gz")
    assert img.shape == (128, 128, 70)
    assert img.header.get_zooms() == pytest.approx((2.625, 2.625, 3.2))
    rows = _rows(out / "strong/nodes.csv") + _rows(out / "weak_truth/nodes.csv")
    assert list(rows[0]) == list(NODE_COLUMNS)
    for r in rows:
        assert float(r["short_axis_mm"]) <= float(r["long_axis_mm"])
        assert float(r["roundness"]) == pytest.approx(
            float(r["short_axis_mm"]) / float(r["long_axis_mm"]), abs=2e-3
        )
        assert float(r["margin_irregularity"]) >= 0
    # the same patients as at the default resolution, in mm
    ref = tmp_path / "ref"
    result = CliRunner().invoke(
        app, ["synth", "--out", str(ref), *args[3:], "--phantom", "realistic"]
    )
    assert result.exit_code == 0, result.output
    keys = ("patient_id", "node_id", "x_mm", "y_mm", "z_mm", "short_axis_mm", "metastatic")
    assert [[r[k] for k in keys] for r in _rows(ref / "strong/nodes.csv")] == [
        [r[k] for k in keys] for r in _rows(out / "strong/nodes.csv")
    ]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--resolution", "fine", "resolution must be one of"),
        ("--resolution", "0.2,2", "in-plane spacing must be in"),
        ("--resolution", "0.5,0.5", "too fine"),
        ("--phantom", "real", "Invalid value"),
        ("--jobs", "0", "Invalid value"),
    ],
)
def test_synth_cli_rejects_bad_resolution_and_phantom(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), f"{option}={value}"])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # rejected before any work


def test_spec_rejects_unknown_phantom() -> None:
    with pytest.raises(ValueError, match="phantom must be one of scaled, realistic"):
        SynthSpec(phantom="lifelike")
    with pytest.raises(ValueError, match="phantom must be one of"):
        make_scan(np.random.default_rng(0), "A", False, phantom="lifelike")
    assert Resolution("x", 4.0, 5.0).is_default
