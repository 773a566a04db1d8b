"""Synthetic two-hospital abdominal-CT phantom with lymph nodes (the ``lymphdx synth`` data).

A procedural, seeded and deterministic phantom in Hounsfield units. Each scan holds an
elliptical body (subcutaneous fat, muscle wall, paraspinal and psoas muscles), a lumbar
spine (vertebral bodies with cortex, discs, canal, neural arch), aorta and IVC with
mesenteric vessels, liver, spleen, two kidneys in perirenal fat, bowel loops and colon
(some with air), retroperitoneal and mesenteric-root fat, and 3-9 lymph nodes that sit in
that fat near the vessels, never inside an organ.

* Benign nodes: smaller (equivalent diameter ≈ 10-22 mm), oval (short/long axis
  0.45-0.75), homogeneous (30-50 HU), some with a fatty hilum.
* Metastatic nodes: rounder (0.7-1.0), larger on average (≈ 14-34 mm, overlapping the
  benign sizes), half heterogeneous, some with a necrotic (≈ 10 HU) centre.

The phantom is *scaled*: nodes are larger than real ones so that they stay resolvable on
the ``quick`` preset's 5×5×6 mm grid, and they lie within ±100 mm (x, y) and ±75 mm (z) of
the volume centre, inside the quick preset's 240×240×192 mm centre crop.

Two "hospitals" differ as real ones do: intensity calibration (B: gain 1.05, +15 HU),
contrast phase (A portal-venous, B arterial), noise level and texture, voxel spacing and
field of view (``HOSPITALS``). Hospital A gives the weak set (scan labels only), B the
strong set (instance masks of all nodes).

Harder variants (``SynthSpec.shift``, ``SynthSpec.node_scale``; ``lymphdx synth --shift
--node-scale``): ``shift`` moves B's acquisition along the line from A's (0: B scanned like A,
1: the default B, 2: twice the default difference; ``shifted_hospital``), ``node_scale``
multiplies every node's diameter range in both hospitals (0.6: nodes 0.6x as large relative
to the voxel). The defaults (1, 1) give exactly the arrays described here.

Clinical resolution and real node sizes (``SynthSpec.resolution``, ``SynthSpec.phantom``;
``lymphdx synth --resolution --phantom``): ``resolution`` writes the same patients (anatomy
and nodes in mm) on a finer grid with the field of view kept (``clinical``: A 0.8 x 0.8 x
2.5 mm, 400 x 400 x 96; B 0.7 x 0.7 x 2 mm, 480 x 480 x 112; ``Resolution``): the anatomy
and the nodes are decided on the hospital's own grid and drawn on the finer one, texture
and noise keep their correlation lengths in mm, the PSF and the partial-volume edge stay in
voxels. ``phantom="realistic"`` draws nodes as in real abdomens instead
(``lymphdx.data.synthetic_realistic``: benign short axis mostly under 10 mm; malignancy
shown by size, roundness, necrosis, heterogeneous enhancement and an irregular margin, not
by brightness), most of them 1-2 voxels on the quick grid. The defaults (``"default"``,
``"scaled"``) give exactly the arrays described above.

Why a whole-volume intensity histogram cannot solve the weak task (see
``benchmarks/shortcut_vs_oracle.py``): everything except the nodes is drawn independently
of the label (body size, organ sizes and positions, bowel gas, contrast timing vary per
patient), the number of nodes has the same distribution in both classes (positives get
metastatic nodes *instead of* some benign ones), node intensities overlap between classes,
and all nodes together are < 0.5 % of the voxels. The label is only visible locally, in
the size, shape and texture of a few nodes.

Determinism: every patient has its own generator derived from ``(seed, set name, index)``
(``patient_rng``), so patient *i* does not depend on how many patients precede it, and the
same seed gives byte-identical arrays.

Axis convention: arrays are ``(z, y, x)``; spacing, origin and node centres are
``(x, y, z)`` in mm in the LPS world frame (x to the patient's left, y posterior,
z superior).

Modules: the hospitals, ``shift`` and ``Resolution`` in
``lymphdx.data.synthetic_hospitals``; tissues and anatomy in
``lymphdx.data.synthetic_anatomy``; nodes (placing, drawing on a grid, rendering; the
scaled population) in ``lymphdx.data.synthetic_nodes``, the realistic population in
``lymphdx.data.synthetic_realistic``; the spec, scans and the data set here.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy import ndimage

from lymphdx.core.files import csv_text, ensure_writable_dir, write_json, write_text
from lymphdx.core.seeding import name_key, seeded_rng
from lymphdx.data.synthetic_anatomy import PhantomGrid, anatomy, smooth_noise, tissue_lut
from lymphdx.data.synthetic_hospitals import (
    Hospital,
    Resolution,
    hospital_by_name,
    resolution_by_name,
    shifted_hospital,
)
from lymphdx.data.synthetic_nodes import (
    SCALED,
    NodeDraw,
    NodePopulation,
    place_node,
    rasterise_node,
    render_node,
)
from lymphdx.data.synthetic_realistic import REALISTIC
from lymphdx.io.geometry import Geometry
from lymphdx.io.volumes import write_volume

__all__ = [
    "NODE_COLUMNS",
    "PHANTOMS",
    "Node",
    "Scan",
    "SynthSpec",
    "make_scan",
    "patient_rng",
    "phantom_by_name",
    "default_n_pos",
    "weak_labels",
    "write_synthetic",
]

HU_MIN, HU_MAX = -1024, 3071  # stored range (int16, as most scanners write)
MAX_NODE_SCALE = 2.0  # SynthSpec.node_scale in (0, MAX_NODE_SCALE]

NODE_COLUMNS = (
    "patient_id",
    "node_id",
    "x_mm",
    "y_mm",
    "z_mm",
    "diameter_mm",
    "metastatic",
    "necrotic",
    "heterogeneous",
    "fatty_hilum",
    "roundness",
    "mean_hu",
    # appended for issue 29 (readers by column name are unaffected)
    "short_axis_mm",
    "long_axis_mm",
    "margin_irregularity",
)

# the node populations of ``--phantom``: today's (default) and real abdomens'
PHANTOMS: dict[str, NodePopulation] = {p.name: p for p in (SCALED, REALISTIC)}


def phantom_by_name(name: str | NodePopulation) -> NodePopulation:
    """The node population ``name`` (``PHANTOMS``), or ``name`` itself if one already."""
    if isinstance(name, NodePopulation):
        return name
    if name not in PHANTOMS:
        raise ValueError(f"phantom must be one of {', '.join(PHANTOMS)}, got {name!r}")
    return PHANTOMS[name]


# the paper's weak set: 57 of 123 scans positive
PAPER_N_WEAK, PAPER_N_POS = 123, 57
SEED_LIMIT = 2**32  # numpy seeds are unsigned 32-bit words; one word keeps seeds simple


def default_n_pos(n_weak: int) -> int:
    """Positive scans among ``n_weak`` at the paper's prevalence (57/123), rounded."""
    return int(n_weak * PAPER_N_POS / PAPER_N_WEAK + 0.5)


@dataclass
class SynthSpec:
    """What ``write_synthetic`` generates: set sizes, the seed and how hard the data are.

    ``n_pos``: positive weak scans; ``None`` (default) follows the paper's prevalence,
    ``round(n_weak * 57 / 123)`` (57 of 123), and is resolved to that number here.
    ``seed``: in ``[0, 2**32)``. ``shift`` (>= 0): how far hospital B's acquisition lies
    from A's (``shifted_hospital``; 0: like A's, 1: the default B, 2: twice the default
    difference). ``node_scale`` (in ``(0, 2]``): multiplies every node's
    equivalent-diameter range in both hospitals. ``resolution``: the grid the scans are
    written on, ``"default"``, ``"clinical"`` or ``"IN,SLICE"`` (hospital A's in-plane
    and slice spacing in mm; ``Resolution``), stored in its canonical spelling.
    ``phantom``: the node population, ``"scaled"`` (today's) or ``"realistic"``.
    """

    n_weak: int = 123
    n_pos: int | None = None
    n_strong: int = 85
    seed: int = 0
    shift: float = 1.0
    node_scale: float = 1.0
    resolution: str = "default"
    phantom: str = "scaled"

    def __post_init__(self) -> None:
        if self.n_weak < 0 or self.n_strong < 0:
            raise ValueError("n_weak and n_strong must be >= 0")
        if self.n_pos is None:
            self.n_pos = default_n_pos(self.n_weak)
        if not 0 <= self.n_pos <= self.n_weak:
            raise ValueError(f"n_pos must be in [0, n_weak={self.n_weak}], got {self.n_pos}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if not (math.isfinite(self.shift) and self.shift >= 0):
            raise ValueError(f"shift must be a finite number >= 0, got {self.shift}")
        if not 0 < self.node_scale <= MAX_NODE_SCALE:
            raise ValueError(
                f"node_scale must be in (0, {MAX_NODE_SCALE:g}], got {self.node_scale}"
            )
        phantom_by_name(self.phantom)
        res = resolution_by_name(self.resolution)
        self.resolution = res.name
        for name in ("A", "B"):
            res.check(self.hospital(name))

    def hospital(self, name: str) -> Hospital:
        """Hospital ``name`` as this spec generates it: A as is, B moved by ``shift``."""
        hp = hospital_by_name(name)
        return shifted_hospital(self.shift) if hp.name == "B" else hp


@dataclass
class Node:
    """One lymph node; ``center_mm`` is world ``(x, y, z)`` (LPS mm).

    ``diameter_mm`` is the equivalent (equal-volume sphere) diameter of the ellipsoid,
    ``roundness`` its short/long axis ratio, ``axes_mm`` its full axis lengths (long,
    middle, short), ``mean_hu`` the mean stored HU over its mask voxels,
    ``margin_irregularity`` the sd of its surface's radial displacement as a fraction of
    the radius (0: a smooth ellipsoid; ``Margin``).
    """

    id: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    metastatic: bool
    necrotic: bool
    heterogeneous: bool
    fatty_hilum: bool
    roundness: float
    mean_hu: float = float("nan")
    axes_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    margin_irregularity: float = 0.0


@dataclass
class Scan:
    """One synthetic scan.

    Attributes:
        hu: ``(z, y, x)`` float32 HU, already rounded and clipped to the stored int16 range.
        instances: ``(z, y, x)`` uint16 node instance ids (0 background, 1..k = ``nodes``).
        geometry: spacing/origin ``(x, y, z)`` mm, identity direction.
        nodes: the nodes, ``nodes[i].id == i + 1``.
        tissue: ``(z, y, x)`` uint8 ``Tissue`` labels of the anatomy without nodes.
        hospital: ``"A"`` or ``"B"``.
    """

    hu: np.ndarray
    instances: np.ndarray
    geometry: Geometry
    nodes: list[Node]
    tissue: np.ndarray | None = None
    hospital: str = "A"

    @property
    def metastatic(self) -> bool:
        """The scan label: True iff at least one node is metastatic."""
        return any(n.metastatic for n in self.nodes)


# --------------------------------------------------------------------------- scans


def make_scan(
    rng: np.random.Generator,
    hospital: str | Hospital,
    metastatic: bool | None,
    node_scale: float = 1.0,
    *,
    phantom: str | NodePopulation = "scaled",
    resolution: str | Resolution | None = None,
) -> Scan:
    """Generate one scan of ``hospital`` (``"A"``/``"weak"``, ``"B"``/``"strong"`` or a
    ``Hospital``, e.g. ``SynthSpec.hospital("B")``).

    ``metastatic``: True gives 1-3 metastatic nodes among the scan's nodes, False none,
    None draws it with the hospital's ``p_metastatic``. Every scan has benign nodes.
    ``node_scale`` multiplies the nodes' sizes (``SynthSpec.node_scale``); ``phantom`` is
    the node population (``PHANTOMS``); ``resolution`` the grid (``Resolution``; None:
    the hospital's own). The anatomy and the nodes are decided on the hospital's own grid,
    so a patient is the same in mm at every resolution.

    Returns:
        A ``Scan`` with ``hu`` ``(z, y, x)`` float32 (int16-valued), ``instances``
        ``(z, y, x)`` uint16 and ``tissue`` ``(z, y, x)`` uint8 on ``geometry``'s grid.
    """
    hp = hospital if isinstance(hospital, Hospital) else hospital_by_name(hospital)
    if not node_scale > 0:
        raise ValueError(f"node_scale must be > 0, got {node_scale}")
    population = phantom_by_name(phantom)
    res = resolution_by_name(resolution)
    res.check(hp)
    if metastatic is None:
        metastatic = bool(rng.random() < hp.p_metastatic)
    shift = rng.uniform(-8, 8, size=3)
    base = PhantomGrid.make(hp.size, hp.spacing, shift)
    vc = shift.astype(float)
    start = rng.bit_generator.state
    bowel: list[bool] = []
    labels, vessels = anatomy(rng, base, bowel=bowel)
    grid, base_labels = base, labels
    if not res.is_default:
        # the same anatomy in mm on the finer grid: replay the reference grid's draws and
        # bowel decisions from the same generator state
        spacing, size = res.grid(hp)
        grid = PhantomGrid.make(size, spacing, shift, base_spacing=hp.spacing)
        replay = np.random.Generator(type(rng.bit_generator)())
        replay.bit_generator.state = start
        labels, _ = anatomy(replay, grid, ref=base, bowel=bowel)
        if replay.bit_generator.state != rng.bit_generator.state:
            raise RuntimeError("synthetic phantom: the anatomy did not replay on the finer grid")

    # Node count does not depend on the label: positives get metastatic nodes instead of
    # some benign ones (see the module docstring on shortcuts).
    n_nodes = int(rng.integers(hp.n_nodes[0], hp.n_nodes[1] + 1))
    n_met = 0
    if metastatic:
        n_met = min(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), n_nodes - 1)
    kinds = [True] * n_met + [False] * (n_nodes - n_met)
    base_instances = np.zeros(base.shape, np.uint16)
    placed: list[tuple[NodeDraw, tuple[float, float, float]]] = []
    for is_met in kinds:
        nd = population.draw(rng, is_met, node_scale)
        center = None
        for _ in range(6):  # shrink a node that does not fit anywhere (rare)
            center = place_node(
                rng,
                base,
                base_labels,
                base_instances,
                vessels,
                nd,
                len(placed) + 1,
                vc,
                fat_margin=population.fat_margin_mm,
            )
            if center is not None:
                break
            nd.diameter *= 0.9
            nd.semi = nd.semi * 0.9
        if center is None:
            raise RuntimeError("synthetic phantom: could not place a lymph node")
        placed.append((nd, center))
    instances = base_instances
    if grid is not base:
        instances = np.zeros(grid.shape, np.uint16)
        for i, (nd, center) in enumerate(placed, start=1):
            rasterise_node(grid, labels, instances, nd, center, i)
    order = rng.permutation(len(placed))  # metastatic nodes are not always id 1
    remap = np.zeros(len(placed) + 1, np.uint16)
    remap[1 + order] = np.arange(1, len(placed) + 1, dtype=np.uint16)
    instances = remap[instances]
    placed = [placed[i] for i in order]

    # Intensities: tissue HU + smooth per-tissue texture, nodes, PSF, noise, calibration.
    # Texture and noise sigmas keep their mm on a finer grid; the PSF stays in voxels.
    lut, amp = tissue_lut(rng, hp)
    tex = smooth_noise(rng, grid.shape, grid.base_voxels(hp.texture_sigma))
    image = lut[labels] + tex * amp[labels]
    del tex
    for nd, center in placed:
        render_node(rng, grid, image, center, nd, hp.texture_gain)
    image = ndimage.gaussian_filter(image, hp.psf_sigma, truncate=3.0)
    image += hp.noise_sd * smooth_noise(rng, grid.shape, grid.base_voxels(hp.noise_sigma))
    image = hp.gain * image + hp.offset
    hu = np.clip(np.rint(image), HU_MIN, HU_MAX).astype(np.float32)
    del image

    nodes = []
    boxes = ndimage.find_objects(instances, max_label=len(placed))
    for i, (nd, center) in enumerate(placed, start=1):
        box = boxes[i - 1]
        # the voxels of hu[instances == i], in the same order: the same float32 mean
        vox = hu[box][instances[box] == i] if box is not None else np.full(1, np.nan, np.float32)
        nodes.append(
            Node(
                id=i,
                center_mm=center,
                diameter_mm=round(nd.diameter, 3),
                metastatic=nd.metastatic,
                necrotic=nd.necrotic,
                heterogeneous=nd.heterogeneous,
                fatty_hilum=nd.fatty_hilum,
                roundness=round(nd.roundness, 4),
                mean_hu=round(float(vox.mean()), 2),
                axes_mm=tuple(round(float(2 * a), 3) for a in nd.semi),
                margin_irregularity=round(nd.margin_irregularity, 4),
            )
        )
    geometry = Geometry(tuple(float(s) for s in grid.spacing), tuple(float(o) for o in grid.origin))
    return Scan(hu, instances, geometry, nodes, labels, hp.name)


# --------------------------------------------------------------------------- data set


def patient_rng(seed: int, set_name: str, index: int) -> np.random.Generator:
    """The generator of patient ``index`` (0-based) of set ``set_name`` ("weak"/"strong")."""
    return seeded_rng(seed, name_key(set_name), index)


def weak_labels(spec: SynthSpec) -> np.ndarray:
    """Scan labels ``(n_weak,)`` int: ``n_pos`` ones in an order shuffled by the seed."""
    labels = np.zeros(spec.n_weak, dtype=int)
    rng = seeded_rng(spec.seed, name_key("weak-labels"))
    labels[rng.permutation(spec.n_weak)[: spec.n_pos]] = 1
    return labels


def _csv(rows: list[list], header) -> str:
    return csv_text(header, rows)


def _node_rows(pid: str, nodes: list[Node]) -> list[list]:
    return [
        [
            pid,
            n.id,
            f"{n.center_mm[0]:.2f}",
            f"{n.center_mm[1]:.2f}",
            f"{n.center_mm[2]:.2f}",
            f"{n.diameter_mm:.2f}",
            int(n.metastatic),
            int(n.necrotic),
            int(n.heterogeneous),
            int(n.fatty_hilum),
            f"{n.roundness:.3f}",
            f"{n.mean_hu:.1f}",
            f"{n.axes_mm[2]:.2f}",
            f"{n.axes_mm[0]:.2f}",
            f"{n.margin_irregularity:.3f}",
        ]
        for n in nodes
    ]


def _pid(prefix: str, i: int, n: int) -> str:
    return f"{prefix}{i + 1:0{max(4, len(str(n)))}d}"


def _write_patient(
    out: Path,
    spec: SynthSpec,
    hospitals: dict[str, Hospital],
    label: bool | None,
    job: tuple[str, int],
) -> tuple[list, list, float]:
    """Make and write one patient of ``job`` = (set name, index); returns its manifest row,
    its node rows and its node voxel fraction. Depends only on its arguments (the
    patient's own generator), so patients can be written in any order or process."""
    set_name, i = job
    rng = patient_rng(spec.seed, set_name, i)
    how = {"phantom": spec.phantom, "resolution": spec.resolution}
    if set_name == "weak":
        pid = _pid("W", i, spec.n_weak)
        scan = make_scan(rng, hospitals["A"], bool(label), spec.node_scale, **how)
        write_volume(out / "weak/images" / f"{pid}.nii.gz", scan.hu.astype(np.int16), scan.geometry)
        write_volume(out / "weak_truth/masks" / f"{pid}.nii.gz", scan.instances, scan.geometry)
        row = [pid, f"images/{pid}.nii.gz", int(scan.metastatic)]
    else:
        pid = _pid("S", i, spec.n_strong)
        scan = make_scan(rng, hospitals["B"], None, spec.node_scale, **how)
        write_volume(
            out / "strong/images" / f"{pid}.nii.gz", scan.hu.astype(np.int16), scan.geometry
        )
        write_volume(out / "strong/masks" / f"{pid}.nii.gz", scan.instances, scan.geometry)
        row = [pid, f"images/{pid}.nii.gz", f"masks/{pid}.nii.gz"]
    fraction = float(np.count_nonzero(scan.instances)) / scan.instances.size
    return row, _node_rows(pid, scan.nodes), fraction


def write_synthetic(
    out: str | Path, spec: SynthSpec | None = None, progress: bool = False, jobs: int = 1
) -> dict:
    """Generate both sets and write them under ``out`` (layout below); return a summary.
    ``jobs`` > 1: patients are made in that many processes; the files are the same bytes.

    Layout (paths in the CSVs are relative to the CSV's folder)::

        out/weak/manifest.csv        patient_id,image,label     images/W0001.nii.gz ...
        out/strong/manifest.csv      patient_id,image,mask      images/S0001.nii.gz, masks/...
        out/strong/nodes.csv         one row per node (NODE_COLUMNS)
        out/weak_truth/masks/W0001.nii.gz, out/weak_truth/nodes.csv  (never used to train)
        out/synth.json               spec (incl. shift, node_scale, resolution, phantom)
                                     + summary + hospitals + grids

    Images are int16 HU, masks uint16 node instance ids. In ``synth.json``, ``hospitals``
    holds each hospital's acquisition on its own (reference) grid, ``grids`` the spacing
    and size the scans were written with (``SynthSpec.resolution``).
    """
    spec = spec or SynthSpec()
    hospitals = {h: spec.hospital(h) for h in ("A", "B")}
    out = ensure_writable_dir(out)  # before minutes of work, not after
    t0 = time.perf_counter()
    labels = weak_labels(spec)
    todo = [("weak", i) for i in range(spec.n_weak)] + [("strong", i) for i in range(spec.n_strong)]
    args = [
        (out, spec, hospitals, bool(labels[i]) if s == "weak" else None, (s, i)) for s, i in todo
    ]
    with ExitStack() as stack:
        if jobs > 1 and len(todo) > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(min(jobs, len(todo)), mp_context=get_context("spawn"))
            )
            results = pool.map(_write_patient, *zip(*args, strict=True), chunksize=4)
        else:
            results = (_write_patient(*a) for a in args)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(todo), desc="synth", unit="scan")
        done = list(results)  # in the order of ``todo``, whatever the process
    weak_rows, weak_nodes, strong_rows, strong_nodes = [], [], [], []
    fractions: dict[str, list[float]] = {"weak": [], "strong": []}
    for (set_name, _), (row, nodes, fraction) in zip(todo, done, strict=True):
        (weak_rows if set_name == "weak" else strong_rows).append(row)
        (weak_nodes if set_name == "weak" else strong_nodes).extend(nodes)
        fractions[set_name].append(fraction)

    write_text(out / "weak/manifest.csv", _csv(weak_rows, ("patient_id", "image", "label")))
    write_text(out / "weak_truth/nodes.csv", _csv(weak_nodes, NODE_COLUMNS))
    write_text(out / "strong/manifest.csv", _csv(strong_rows, ("patient_id", "image", "mask")))
    write_text(out / "strong/nodes.csv", _csv(strong_nodes, NODE_COLUMNS))

    def stats(v: list[float]) -> dict:
        a = np.asarray(v) if v else np.zeros(1)
        return {"mean": float(a.mean()), "max": float(a.max())}

    summary = {
        "n_weak": spec.n_weak,
        "n_weak_positive": int(sum(r[2] for r in weak_rows)),
        "n_strong": spec.n_strong,
        "n_strong_with_metastatic": len({r[0] for r in strong_nodes if r[6]}),
        "n_nodes_weak": len(weak_nodes),
        "n_nodes_strong": len(strong_nodes),
        "n_metastatic_nodes_weak": int(sum(r[6] for r in weak_nodes)),
        "n_metastatic_nodes_strong": int(sum(r[6] for r in strong_nodes)),
        "node_voxel_fraction": {k: stats(v) for k, v in fractions.items()},
        "shift": spec.shift,
        "node_scale": spec.node_scale,
        "resolution": spec.resolution,
        "phantom": spec.phantom,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    resolution = resolution_by_name(spec.resolution)
    grids = {}
    for set_name, h in (("weak", "A"), ("strong", "B")):
        spacing, size = resolution.grid(hospitals[h])
        grids[set_name] = {"spacing": list(spacing), "size": list(size)}
    write_json(
        out / "synth.json",
        {
            "spec": asdict(spec),
            "summary": summary,
            "hospitals": {"weak": asdict(hospitals["A"]), "strong": asdict(hospitals["B"])},
            "grids": grids,
        },
    )
    return summary
