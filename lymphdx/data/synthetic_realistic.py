"""The ``realistic`` node population (``lymphdx synth --phantom realistic``): lymph nodes
of the size and appearance of real abdominal nodes.

Sizes are short axis S and long axis L (the ellipsoid's full axes; the middle axis lies
between them), drawn per node:

* Benign: S = 3 + 9 Beta(1.6, 3.4) mm (median 5.7, 95th percentile 9.1; 1.4 % over 10
  mm), S/L = 0.35 + 0.45 Beta(2, 2.5) (oval, mean 0.55), L at most 16 mm; homogeneous
  (3 HU texture); a fatty hilum in 30 % of nodes with S >= 5 mm; rarely (5 % each) a
  heterogeneous texture or a mildly irregular margin, as reactive nodes show.
* Metastatic: S = 5 + 15 Beta(1.3, 2) mm (median 10.6; 45 % under 10 mm, so the sizes
  overlap), S/L = 0.55 + 0.45 Beta(2.5, 1.5) (round, mean 0.83; L at most 30 mm);
  necrosis (a central low-attenuation core, 5-20 HU) with probability 0.1 + 0.4 (S - 5)
  / 15; heterogeneous enhancement (15 HU texture of 1.5 mm correlation) in 60 %; an
  irregular, lobulated margin (``Margin``: radial displacement of 8-18 % of the radius,
  sd) in 50 %; never a fatty hilum.
* Enhancement: 30-50 HU in both classes. At equal size the classes' mean attenuation
  differs by about +1 HU (necrosis lowers metastatic nodes, a fatty hilum benign ones;
  tests/test_synthetic_clinical.py). A mask's mean still rises with the node's size and
  roundness through partial volume, as in real scans, so over whole scans metastatic nodes
  read brighter: +12 HU at the clinical resolution, +26 HU on the default grid
  (benchmarks/node_sizes.py, 20 patients, seed 0). That is a size sign, not an
  enhancement offset: a recipe that reads it reads size.

What this rests on:

* Normal abdominal and pelvic nodes are small: upper limits of normal short axis 6-11 mm
  by station in the upper abdomen (Dorfman et al., Radiology 1991;180:319-22), a median
  short axis of 5 mm or less and fewer than 2 % over 10 mm in the pelvis (Vinnicombe et al.,
  Radiology 1995;194:349-55). RECIST 1.1 calls a node with short axis < 10 mm normal,
  10-15 mm pathological, >= 15 mm a target (Schwartz et al., Eur J Cancer 2009;45:261-7).
* Size alone separates poorly: in colon cancer no CT size criterion predicted nodal
  metastasis, while internal heterogeneity (sensitivity 79 %, specificity 84 % per patient)
  and an irregular outer border (59 %, 81 %) did (Rollvén et al., Cancer Imaging 2017;17:3).
* Malignant nodes are round: a long-to-short axis ratio < 2 in 94 of 96 malignant nodes;
  low-attenuation centres with rim enhancement (necrosis) in 78 % of them and in no benign
  node, the specific sign (Radiology 1994;191:795-8, helical CT of cervical nodes).
"""

from __future__ import annotations

import numpy as np

from lymphdx.data.synthetic_anatomy import _random_rotation
from lymphdx.data.synthetic_nodes import Margin, NodeDraw, NodePopulation

__all__ = [
    "BENIGN_LONG_MAX_MM",
    "BENIGN_SHORT_AXIS_MM",
    "METASTATIC_LONG_MAX_MM",
    "METASTATIC_SHORT_AXIS_MM",
    "REALISTIC",
    "draw_realistic_node",
]

# (lo, hi, beta a, beta b): S = lo + (hi - lo) * Beta(a, b), mm
BENIGN_SHORT_AXIS_MM = (3.0, 12.0, 1.6, 3.4)
METASTATIC_SHORT_AXIS_MM = (5.0, 20.0, 1.3, 2.0)
BENIGN_SHORT_LONG = (0.35, 0.80, 2.0, 2.5)  # S / L
METASTATIC_SHORT_LONG = (0.55, 1.0, 2.5, 1.5)
BENIGN_LONG_MAX_MM = 16.0
METASTATIC_LONG_MAX_MM = 30.0


def _beta_range(rng: np.random.Generator, spec: tuple[float, float, float, float]) -> float:
    lo, hi, a, b = spec
    return float(lo + (hi - lo) * rng.beta(a, b))


def draw_realistic_node(rng: np.random.Generator, metastatic: bool, scale: float = 1.0) -> NodeDraw:
    """Draw one node of the realistic population (module docstring); ``scale``
    (``--node-scale``) multiplies its lengths (axes, the long-axis caps and the size
    thresholds of necrosis and the fatty hilum)."""
    if metastatic:
        short = scale * _beta_range(rng, METASTATIC_SHORT_AXIS_MM)
        ratio = _beta_range(rng, METASTATIC_SHORT_LONG)
        long = min(short / ratio, scale * METASTATIC_LONG_MAX_MM)
        middle = short + rng.uniform(0, 1) * (long - short)
        lo, hi = (scale * v for v in METASTATIC_SHORT_AXIS_MM[:2])
        necrotic = bool(rng.random() < 0.1 + 0.4 * (short - lo) / (hi - lo))
        hetero = bool(rng.random() < 0.6)
        irregular = rng.random() < 0.5
        amplitude = rng.uniform(0.08, 0.18)
        hilum = False
    else:
        short = scale * _beta_range(rng, BENIGN_SHORT_AXIS_MM)
        ratio = _beta_range(rng, BENIGN_SHORT_LONG)
        long = min(short / ratio, scale * BENIGN_LONG_MAX_MM)
        middle = short + rng.uniform(0, 0.5) * (long - short)
        necrotic = False
        hetero = bool(rng.random() < 0.05)
        irregular = rng.random() < 0.05
        amplitude = rng.uniform(0.03, 0.06)
        hilum = bool(short >= 5.0 * scale and rng.random() < 0.3)
    semi = np.array([long, middle, short]) / 2.0
    margin = Margin.draw(rng, amplitude) if irregular else None
    return NodeDraw(
        metastatic=metastatic,
        diameter=float(np.prod(2 * semi) ** (1 / 3)),
        roundness=float(short / long),
        semi=semi,
        rot=_random_rotation(rng),
        hu=float(rng.uniform(30, 50)),
        heterogeneous=hetero,
        necrotic=necrotic,
        necrosis_scale=float(rng.uniform(0.35, 0.6)),
        necrosis_hu=float(rng.uniform(5, 20)),
        fatty_hilum=hilum,
        hilum_hu=float(rng.uniform(-85, -55)),
        texture_hu=15.0 if hetero else 3.0,
        texture_sigma_mm=1.5 if hetero else 2.0,
        margin=margin,
    )


# fat_margin_mm: a 3-5 mm node covers one or two voxels of the 4 mm reference grid, so its
# surface on a 0.7 mm grid may reach up to half a reference voxel past what place_node saw
REALISTIC = NodePopulation("realistic", draw_realistic_node, fat_margin_mm=2.0)
