"""BENCHMARKS.md section 3.4: per-node findings against the hand-made ellipsoids of
``tests/test_findings.py`` (their true axes, volume and centre).

Usage (from the repository root): PYTHONPATH=. python benchmarks/findings_accuracy.py
"""

from __future__ import annotations

import math

import numpy as np

from lymphdx.workflows.findings import find_nodes
from tests.test_findings import GRIDS, _ellipsoids


def main() -> None:
    print("| grid | long axis (true) | short axis (true) | volume mm³ (true) | centre error mm |")
    print("|---|---|---|---|---|")
    for name, (geometry, shape) in GRIDS.items():
        a = geometry.affine_lps()
        middle = a[:3, :3] @ (np.array(shape[::-1]) / 2.0) + a[:3, 3]
        nodes = [
            (middle + [-12.0, 5.0, 0.0], np.array([10.0, 6.0, 8.0]), 0.95),
            (middle + [15.0, -10.0, 6.0], np.array([4.0, 4.0, 5.0]), 0.85),
        ]
        found = find_nodes(_ellipsoids(geometry, shape, nodes), 0.8, geometry)
        for f, (centre, semi, _), size in zip(found, nodes, ("large", "small"), strict=True):
            error = float(np.linalg.norm(np.array(f.centre_lps) - centre))
            print(
                f"| {name}, {size} | {f.long_axis_mm:.2f} ({2 * max(semi[:2]):g}) | "
                f"{f.short_axis_mm:.2f} ({2 * min(semi[:2]):g}) | {f.volume_mm3:.0f} "
                f"({4 / 3 * math.pi * semi.prod():.0f}) | {error:.3f} |"
            )


if __name__ == "__main__":
    main()
