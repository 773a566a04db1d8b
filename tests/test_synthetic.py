"""Tests of the synthetic two-hospital phantom (``lymphdx.data.synthetic``)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from lymphdx.cli import app
from lymphdx.data.synthetic import (
    NODE_COLUMNS,
    Scan,
    SynthSpec,
    make_scan,
    patient_rng,
    weak_labels,
    write_synthetic,
)
from lymphdx.data.synthetic_anatomy import Tissue
from lymphdx.data.synthetic_hospitals import (
    HOSPITALS,
    MIN_SPACING_MM,
    SHIFT_FIELDS,
    SHIFT_FLOORS,
    SHIFT_HU_FIELDS,
    SHIFT_HU_RANGE,
    shifted_hospital,
)
from lymphdx.data.synthetic_nodes import (
    BENIGN_DIAMETER,
    METASTATIC_DIAMETER,
    NODE_XY_RANGE_MM,
    NODE_Z_RANGE_MM,
)

SPEC = SynthSpec(n_weak=6, n_pos=3, n_strong=4, seed=11)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _header(path: Path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    summary = write_synthetic(out, SPEC)
    return out, summary


@pytest.fixture(scope="module")
def scans() -> dict[str, list[Scan]]:
    """A few scans of each hospital, half of them with metastatic nodes."""
    return {
        h: [make_scan(patient_rng(7, f"test-{h}", i), h, bool(i % 2)) for i in range(8)]
        for h in ("A", "B")
    }


def _node_voxel(scan: Scan, center) -> tuple[int, int, int]:
    g = scan.geometry
    ijk = np.rint((np.asarray(center) - g.origin) / g.spacing).astype(int)
    return (int(ijk[2]), int(ijk[1]), int(ijk[0]))


# ------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_different_seed_differs() -> None:
    for h in ("A", "B"):
        a = make_scan(patient_rng(0, "weak", 4), h, True)
        b = make_scan(patient_rng(0, "weak", 4), h, True)
        c = make_scan(patient_rng(1, "weak", 4), h, True)
        assert a.hu.tobytes() == b.hu.tobytes()
        assert a.instances.tobytes() == b.instances.tobytes()
        assert a.geometry == b.geometry
        assert a.nodes == b.nodes
        assert a.hu.shape != c.hu.shape or a.hu.tobytes() != c.hu.tobytes()
        assert a.geometry != c.geometry


def test_patient_does_not_depend_on_set_size(data: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = data
    small = SynthSpec(n_weak=2, n_pos=1, n_strong=2, seed=SPEC.seed)
    write_synthetic(tmp_path, small)
    # Strong patients depend on (seed, "strong", index) only.
    for pid in ("S0001", "S0002"):
        a = nib.load(out / "strong/images" / f"{pid}.nii.gz").get_fdata()
        b = nib.load(tmp_path / "strong/images" / f"{pid}.nii.gz").get_fdata()
        np.testing.assert_array_equal(a, b)
    # The written weak image is exactly make_scan of that patient with its label.
    labels = weak_labels(SPEC)
    scan = make_scan(patient_rng(SPEC.seed, "weak", 2), "A", bool(labels[2]))
    img = np.asanyarray(nib.load(out / "weak/images/W0003.nii.gz").dataobj)
    assert img.dtype == np.int16
    np.testing.assert_array_equal(img.transpose(2, 1, 0), scan.hu.astype(np.int16))


def test_two_processes_write_the_same_files(tmp_path: Path) -> None:
    """jobs=2 makes the patients in two processes: every file (images, masks, manifests,
    node tables) is byte for byte what one process writes, rows in the same order."""
    spec = SynthSpec(n_weak=3, n_pos=1, n_strong=2, seed=SPEC.seed)
    one = write_synthetic(tmp_path / "one", spec)
    two = write_synthetic(tmp_path / "two", spec, jobs=2)
    files = sorted(
        p.relative_to(tmp_path / "one")
        for p in (tmp_path / "one").rglob("*")
        if p.is_file() and p.name != "synth.json"
    )
    assert len(files) == 4 + 2 * 3 + 2 * 2  # manifests and node tables, 3 + 2 patients
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    del one["seconds"], two["seconds"]
    assert one == two


def test_write_is_reproducible(data: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = data
    write_synthetic(tmp_path, SynthSpec(n_weak=1, n_pos=1, n_strong=1, seed=SPEC.seed))
    rows = _rows(tmp_path / "weak/manifest.csv")
    assert rows[0]["label"] == "1"
    for rel in ("strong/images/S0001.nii.gz", "strong/masks/S0001.nii.gz"):
        a = np.asanyarray(nib.load(out / rel).dataobj)
        b = np.asanyarray(nib.load(tmp_path / rel).dataobj)
        assert a.tobytes() == b.tobytes()


# ------------------------------------------------------------------ layout and labels


def test_layout_and_manifests(data: tuple[Path, dict]) -> None:
    out, summary = data
    assert _header(out / "weak/manifest.csv") == ["patient_id", "image", "label"]
    assert _header(out / "strong/manifest.csv") == ["patient_id", "image", "mask"]
    assert _header(out / "strong/nodes.csv") == list(NODE_COLUMNS)
    assert _header(out / "weak_truth/nodes.csv") == list(NODE_COLUMNS)
    weak = _rows(out / "weak/manifest.csv")
    strong = _rows(out / "strong/manifest.csv")
    assert [r["patient_id"] for r in weak] == [f"W{i:04d}" for i in range(1, 7)]
    assert [r["patient_id"] for r in strong] == [f"S{i:04d}" for i in range(1, 5)]
    for r in weak:
        assert r["image"] == f"images/{r['patient_id']}.nii.gz"
        assert (out / "weak" / r["image"]).is_file()
        assert (out / "weak_truth/masks" / f"{r['patient_id']}.nii.gz").is_file()
    for r in strong:
        assert (out / "strong" / r["image"]).is_file()
        assert r["mask"] == f"masks/{r['patient_id']}.nii.gz"
        assert (out / "strong" / r["mask"]).is_file()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers
    meta = json.loads((out / "synth.json").read_text())
    assert meta["spec"] == {
        "n_weak": 6,
        "n_pos": 3,
        "n_strong": 4,
        "seed": 11,
        "shift": 1.0,
        "node_scale": 1.0,
        "resolution": "default",
        "phantom": "scaled",
    }
    assert meta["summary"]["shift"] == 1.0 and meta["summary"]["node_scale"] == 1.0
    assert meta["grids"]["weak"] == {"spacing": [4.0, 4.0, 5.0], "size": [80, 80, 48]}
    assert meta["grids"]["strong"] == {"spacing": [3.5, 3.5, 4.0], "size": [96, 96, 56]}
    assert meta["summary"]["n_weak_positive"] == 3
    assert summary["n_weak"] == 6 and summary["n_strong"] == 4
    assert summary["seconds"] > 0


def test_labels_positive_iff_metastatic_node(data: tuple[Path, dict]) -> None:
    out, _ = data
    weak = _rows(out / "weak/manifest.csv")
    nodes = _rows(out / "weak_truth/nodes.csv")
    assert sum(int(r["label"]) for r in weak) == SPEC.n_pos
    for r in weak:
        mine = [n for n in nodes if n["patient_id"] == r["patient_id"]]
        n_met = sum(int(n["metastatic"]) for n in mine)
        assert int(r["label"]) == int(n_met > 0)
        assert n_met <= 3
        assert len(mine) - n_met >= 1  # every scan has benign nodes
        assert 3 <= len(mine) <= 9


def test_weak_labels_shuffled_by_seed() -> None:
    a = weak_labels(SynthSpec(seed=0))
    b = weak_labels(SynthSpec(seed=1))
    assert a.sum() == b.sum() == 57 and len(a) == 123
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.sort(a)) and not np.array_equal(a, np.sort(a)[::-1])


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="n_pos"):
        SynthSpec(n_weak=3, n_pos=4)
    with pytest.raises(ValueError, match="hospital"):
        make_scan(np.random.default_rng(0), "C", False)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift must be a finite number >= 0"):
            SynthSpec(shift=bad)
    for bad in (0.0, -1.0, 2.5, float("nan")):
        with pytest.raises(ValueError, match=r"node_scale must be in \(0, 2\]"):
            SynthSpec(node_scale=bad)
    SynthSpec(shift=0.0, node_scale=2.0)  # the bounds themselves are valid
    with pytest.raises(ValueError, match="node_scale"):
        make_scan(np.random.default_rng(0), "A", False, node_scale=0.0)


def test_make_scan_label_control(scans: dict[str, list[Scan]]) -> None:
    for h, lst in scans.items():
        for i, s in enumerate(lst):
            n_met = sum(n.metastatic for n in s.nodes)
            assert s.metastatic == bool(i % 2)
            assert (n_met >= 1) == bool(i % 2) and n_met <= 3
            lo, hi = HOSPITALS[h].n_nodes
            assert lo <= len(s.nodes) <= hi
            assert any(not n.metastatic for n in s.nodes)


# ------------------------------------------------------------------ masks and geometry


@pytest.mark.parametrize("part", ["weak", "strong"])
def test_masks_match_nodes_csv(data: tuple[Path, dict], part: str) -> None:
    out, _ = data
    if part == "weak":
        ids = [r["patient_id"] for r in _rows(out / "weak/manifest.csv")]
        nodes = _rows(out / "weak_truth/nodes.csv")
        masks = {p: out / "weak_truth/masks" / f"{p}.nii.gz" for p in ids}
        images = {p: out / "weak/images" / f"{p}.nii.gz" for p in ids}
    else:
        rows = _rows(out / "strong/manifest.csv")
        nodes = _rows(out / "strong/nodes.csv")
        masks = {r["patient_id"]: out / "strong" / r["mask"] for r in rows}
        images = {r["patient_id"]: out / "strong" / r["image"] for r in rows}
    for pid, path in masks.items():
        mimg = nib.load(path)
        mask = np.asanyarray(mimg.dataobj)
        assert mask.dtype == np.uint16
        mine = [n for n in nodes if n["patient_id"] == pid]
        assert [int(n["node_id"]) for n in mine] == list(range(1, len(mine) + 1))
        assert set(np.unique(mask)) == set(range(len(mine) + 1))
        assert np.count_nonzero(mask) / mask.size < 0.01  # nodes are a small fraction
        img = nib.load(images[pid])
        np.testing.assert_allclose(mimg.affine, img.affine, atol=1e-4)
        hu = np.asanyarray(img.dataobj)
        inv = np.linalg.inv(img.affine)
        for n in mine:
            # nodes.csv holds LPS mm; nibabel's affine maps voxel (i, j, k) to RAS mm.
            ras = np.array([-float(n["x_mm"]), -float(n["y_mm"]), float(n["z_mm"]), 1.0])
            ijk = tuple(np.rint(inv @ ras)[:3].astype(int))
            assert mask[ijk] == int(n["node_id"]), (pid, n["node_id"])
            assert float(n["mean_hu"]) == pytest.approx(
                hu[mask == int(n["node_id"])].mean(), abs=0.06
            )


def test_nibabel_spacing_and_affine(data: tuple[Path, dict]) -> None:
    out, _ = data
    labels = weak_labels(SPEC)
    cases = [("A", out / "weak/images/W0001.nii.gz", patient_rng(SPEC.seed, "weak", 0), labels[0])]
    cases.append(
        ("B", out / "strong/images/S0002.nii.gz", patient_rng(SPEC.seed, "strong", 1), None)
    )
    for h, path, rng, label in cases:
        img = nib.load(path)
        scan = make_scan(rng, h, None if label is None else bool(label))
        assert img.header.get_zooms() == pytest.approx(HOSPITALS[h].spacing)
        assert img.shape == HOSPITALS[h].size  # nibabel is (x, y, z)
        np.testing.assert_allclose(img.affine, scan.geometry.affine_ras(), atol=1e-4)
        # the volume is centred near world (0, 0, 0)
        centre = scan.geometry.affine_lps() @ np.append((np.asarray(img.shape) - 1) / 2, 1)
        assert np.all(np.abs(centre[:3]) <= 8.0 + 1e-6)


# ------------------------------------------------------------------ anatomy and nodes


def test_nodes_small_in_fat_near_centre(scans: dict[str, list[Scan]]) -> None:
    for lst in scans.values():
        for s in lst:
            assert s.hu.dtype == np.float32 and s.instances.dtype == np.uint16
            assert s.tissue is not None and s.tissue.shape == s.hu.shape == s.instances.shape
            assert np.count_nonzero(s.instances) / s.instances.size < 0.01
            # every node voxel lies in retroperitoneal/mesenteric fat, never in an organ
            assert np.isin(s.tissue[s.instances > 0], Tissue.NODE_FAT).all()
            g = s.geometry
            vc = np.asarray(g.origin) + np.asarray(g.spacing) * (np.array(s.hu.shape[::-1]) - 1) / 2
            fat_hu = np.median(s.hu[ndimage.binary_erosion(np.isin(s.tissue, Tissue.NODE_FAT))])
            for n in s.nodes:
                off = np.abs(np.asarray(n.center_mm) - vc)
                assert off[0] <= NODE_XY_RANGE_MM and off[1] <= NODE_XY_RANGE_MM
                assert off[2] <= NODE_Z_RANGE_MM
                v = _node_voxel(s, n.center_mm)
                assert s.instances[v] == n.id
                if not (n.necrotic or n.fatty_hilum):
                    # the node core is soft tissue, brighter than the fat around it; thin
                    # nodes (short axis < 2 voxels) lose contrast to partial volume
                    near = tuple(slice(max(0, c - 1), c + 2) for c in v)
                    core = float(s.hu[near][s.instances[near] == n.id].mean())
                    thick = n.axes_mm[2] >= 2 * max(g.spacing)
                    assert -45 < core < 130, (n, core)
                    assert core > fat_hu + (65 if thick else 35), (n, core, fat_hu)
                assert n.mean_hu > fat_hu + 20  # partial volume included, still above fat


def test_node_populations(scans: dict[str, list[Scan]]) -> None:
    nodes = [n for lst in scans.values() for s in lst for n in s.nodes]
    ben = np.array([n.diameter_mm for n in nodes if not n.metastatic])
    met = np.array([n.diameter_mm for n in nodes if n.metastatic])
    assert len(met) >= 8 and len(ben) >= 30
    # nodes that did not fit may have been shrunk, never grown
    assert ben.max() <= BENIGN_DIAMETER[1] and met.max() <= METASTATIC_DIAMETER[1]
    assert ben.min() >= 0.5 * BENIGN_DIAMETER[0]
    assert met.mean() > ben.mean() + 4  # metastatic larger on average ...
    assert met.min() < ben.max()  # ... but the sizes overlap
    rb = np.array([n.roundness for n in nodes if not n.metastatic])
    rm = np.array([n.roundness for n in nodes if n.metastatic])
    assert rm.mean() > rb.mean() + 0.15 and rm.min() < rb.max()
    assert not any(n.necrotic or n.heterogeneous for n in nodes if not n.metastatic)
    assert not any(n.fatty_hilum for n in nodes if n.metastatic)
    for n in nodes:  # roundness is short / long axis of the ellipsoid
        assert n.roundness == pytest.approx(n.axes_mm[2] / n.axes_mm[0], abs=2e-3)
        d_eq = float(np.prod(n.axes_mm)) ** (1 / 3)
        assert d_eq == pytest.approx(n.diameter_mm, rel=2e-3)


def test_hospitals_differ(scans: dict[str, list[Scan]]) -> None:
    def aorta(s: Scan) -> float:
        return float(np.median(s.hu[ndimage.binary_erosion(s.tissue == Tissue.ARTERY)]))

    def noise(s: Scan) -> float:
        return float(s.hu[ndimage.binary_erosion(s.tissue == Tissue.SUBQ_FAT)].std())

    def liver(s: Scan) -> float:
        return float(np.median(s.hu[ndimage.binary_erosion(s.tissue == Tissue.LIVER)]))

    a, b = scans["A"], scans["B"]
    # contrast phase: arterial B has a brighter aorta and a darker liver than portal-venous A
    assert min(map(aorta, b)) > max(map(aorta, a)) + 40
    assert np.mean([aorta(s) for s in a]) == pytest.approx(150, abs=25)
    assert np.mean([liver(s) for s in b]) < np.mean([liver(s) for s in a]) - 10
    # noise: B is noisier
    assert min(map(noise, b)) > 1.5 * max(map(noise, a))
    # grids
    assert {s.hu.shape for s in a} == {HOSPITALS["A"].size[::-1]}
    assert {s.hu.shape for s in b} == {HOSPITALS["B"].size[::-1]}
    assert {s.geometry.spacing for s in b} == {HOSPITALS["B"].spacing}


def test_body_anatomy_plausible(scans: dict[str, list[Scan]]) -> None:
    s = scans["A"][0]
    t = s.tissue
    air = s.hu[ndimage.binary_erosion(t == Tissue.AIR, iterations=2)]
    assert np.median(air) == pytest.approx(-1000, abs=20)
    for label, lo, hi in [
        (Tissue.SUBQ_FAT, -130, -70),
        (Tissue.MUSCLE, 30, 75),
        (Tissue.BONE_CANCELLOUS, 250, 800),
    ]:
        med = np.median(s.hu[ndimage.binary_erosion(t == label)])
        assert lo < med < hi, (label, med)
    for label in (Tissue.LIVER, Tissue.KIDNEY, Tissue.BOWEL_AIR, Tissue.RETRO_FAT, Tissue.VEIN):
        assert np.any(t == label), label
    # the body does not touch the edge of the field of view
    body = t > 0
    assert not body[:, 0, :].any() and not body[:, -1, :].any()
    assert not body[:, :, 0].any() and not body[:, :, -1].any()


# ------------------------------------------------------------------ harder data: shift, node_scale


def _fov(h) -> np.ndarray:
    return np.asarray(h.size) * np.asarray(h.spacing)


def test_default_knobs_leave_the_data_unchanged(data: tuple[Path, dict], tmp_path: Path) -> None:
    explicit = SynthSpec(shift=1.0, node_scale=1.0)
    assert explicit == SynthSpec()
    assert shifted_hospital(1.0) == HOSPITALS["B"]  # the general formula, exact at 1
    assert explicit.hospital("A") == HOSPITALS["A"] and explicit.hospital("B") == HOSPITALS["B"]
    for h in ("A", "B"):
        old = make_scan(patient_rng(3, "weak", 1), h, True)
        new = make_scan(patient_rng(3, "weak", 1), explicit.hospital(h), True, explicit.node_scale)
        assert old.hu.tobytes() == new.hu.tobytes()
        assert old.instances.tobytes() == new.instances.tobytes()
        assert old.geometry == new.geometry and old.nodes == new.nodes
    # the written files of an explicit (1, 1) spec equal the default spec's
    out, _ = data
    write_synthetic(tmp_path, SynthSpec(n_weak=1, n_pos=1, n_strong=1, seed=SPEC.seed, shift=1.0))
    for rel in ("strong/images/S0001.nii.gz", "strong/masks/S0001.nii.gz"):
        a = np.asanyarray(nib.load(out / rel).dataobj)
        b = np.asanyarray(nib.load(tmp_path / rel).dataobj)
        assert a.tobytes() == b.tobytes()


def test_shift_zero_gives_b_the_acquisition_of_a() -> None:
    a, b = HOSPITALS["A"], HOSPITALS["B"]
    h = SynthSpec(shift=0.0).hospital("B")
    assert SynthSpec(shift=0.0).hospital("A") == a  # A never moves
    for f in SHIFT_FIELDS:
        assert getattr(h, f) == getattr(a, f), f
    for f in SHIFT_HU_FIELDS:
        assert getattr(h, f) == (getattr(a, f)[0], getattr(b, f)[1]), f  # sd stays B's
    assert h.spacing == a.spacing
    assert h.size == (84, 84, 45)  # B's field of view (336 x 336 x 224 mm) on A's voxels
    assert np.all(np.abs(_fov(h) - _fov(b)) <= np.asarray(h.spacing) / 2)
    assert (h.name, h.n_nodes, h.p_metastatic) == ("B", b.n_nodes, b.p_metastatic)
    scan = make_scan(patient_rng(0, "strong", 0), h, True)
    assert scan.geometry.spacing == a.spacing and scan.hu.shape == (45, 84, 84)
    assert scan.hospital == "B"


def test_shift_two_doubles_the_difference() -> None:
    h = shifted_hospital(2.0)
    # by hand: A + 2 (B - A)
    assert h.gain == pytest.approx(1.10)
    assert h.offset == pytest.approx(30.0)
    assert h.noise_sd == pytest.approx(38.0)
    assert h.texture_gain == pytest.approx(1.6)
    assert h.texture_sigma == pytest.approx(0.5)
    assert h.psf_sigma == pytest.approx(0.4)
    assert h.noise_sigma == SHIFT_FLOORS["noise_sigma"]  # 1 + 2 (0.5 - 1) = 0, clamped
    expected_hu = {
        "aorta_hu": (350.0, 25.0),
        "vein_hu": (35.0, 12.0),
        "liver_hu": (30.0, 8.0),
        "spleen_hu": (110.0, 15.0),
        "kidney_hu": (215.0, 20.0),
        "bowel_wall_hu": (35.0, 6.0),
    }
    for f, (mean, sd) in expected_hu.items():
        assert getattr(h, f) == (pytest.approx(mean), sd), f
    assert h.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert h.size == (112, 112, 75)  # 336 / 3, 224 / 3 rounded
    # a scan shows it: the arterial aorta is brighter still (gain * 350 + 30 ≈ 415 HU)
    s = make_scan(patient_rng(0, "strong", 1), h, False)
    aorta = float(np.median(s.hu[ndimage.binary_erosion(s.tissue == Tissue.ARTERY)]))
    assert aorta == pytest.approx(1.1 * 350 + 30, abs=90)
    assert s.hu.shape == (75, 112, 112)


def test_large_shift_is_clamped_to_valid_values() -> None:
    h = shifted_hospital(10.0)
    assert h.gain > 0 and h.noise_sd > 0
    for f, floor in SHIFT_FLOORS.items():
        assert getattr(h, f) >= floor, f
    assert h.noise_sigma > 0 and h.texture_sigma > 0 and h.psf_sigma > 0
    for f in SHIFT_HU_FIELDS:
        assert SHIFT_HU_RANGE[0] <= getattr(h, f)[0] <= SHIFT_HU_RANGE[1], f
    assert h.spacing == (MIN_SPACING_MM,) * 3
    assert np.all(np.abs(_fov(h) - _fov(HOSPITALS["B"])) <= MIN_SPACING_MM / 2)


def test_node_scale_shrinks_nodes() -> None:
    def scans(scale: float) -> list[Scan]:
        return [
            make_scan(patient_rng(5, "scale", i), h, bool(i % 2), scale)
            for h in ("A", "B")
            for i in range(4)
        ]

    big, small = scans(1.0), scans(0.6)
    d_big = np.array([n.diameter_mm for s in big for n in s.nodes])
    d_small = np.array([n.diameter_mm for s in small for n in s.nodes])
    assert d_small.mean() / d_big.mean() == pytest.approx(0.6, abs=0.08)
    # nodes that did not fit may have been shrunk, never grown
    for s in small:
        for n in s.nodes:
            hi = (METASTATIC_DIAMETER if n.metastatic else BENIGN_DIAMETER)[1]
            assert n.diameter_mm <= 0.6 * hi + 1e-6
    # masks shrink with the nodes (volume ~ 0.6^3 ≈ 0.22, less at the voxel scale)
    vox_big = sum(np.count_nonzero(s.instances) for s in big) / len(d_big)
    vox_small = sum(np.count_nonzero(s.instances) for s in small) / len(d_small)
    assert vox_small < 0.45 * vox_big
    # every node still covers its centre voxel; the labels do not change
    for s in small:
        assert set(np.unique(s.instances)) == set(range(len(s.nodes) + 1))
    assert [s.metastatic for s in small] == [s.metastatic for s in big]


def test_synth_cli_knobs_recorded(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "d"
    args = ["synth", "--out", str(out), "--n-weak", "1", "--n-pos", "1", "--n-strong", "1"]
    result = runner.invoke(app, [*args, "--shift", "2.0", "--node-scale", "0.6"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "synth.json").read_text())
    assert meta["summary"]["shift"] == 2.0 and meta["summary"]["node_scale"] == 0.6
    assert meta["spec"]["shift"] == 2.0 and meta["spec"]["node_scale"] == 0.6
    assert meta["hospitals"]["strong"]["spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert meta["hospitals"]["weak"] == json.loads(json.dumps(asdict(HOSPITALS["A"])))
    img = nib.load(out / "strong/images/S0001.nii.gz")
    assert img.shape == (112, 112, 75)
    assert img.header.get_zooms() == pytest.approx((3.0, 3.0, 3.0))
    nodes = _rows(out / "strong/nodes.csv") + _rows(out / "weak_truth/nodes.csv")
    assert max(float(n["diameter_mm"]) for n in nodes) <= 0.6 * METASTATIC_DIAMETER[1]


@pytest.mark.parametrize(
    ("option", "value", "name"),
    [
        ("--shift", "-1", "shift"),
        ("--shift", "nan", "shift"),
        ("--node-scale", "0", "node_scale"),
        ("--node-scale", "2.5", "node_scale"),
    ],
)
def test_synth_cli_rejects_bad_knobs(tmp_path: Path, option: str, value: str, name: str) -> None:
    out = tmp_path / "d"
    result = CliRunner().invoke(app, ["synth", "--out", str(out), f"{option}={value}"])
    assert result.exit_code == 2
    assert f"{name} must be" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # rejected before any work
