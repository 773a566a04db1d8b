"""What does ``lymphdx synth`` cost per scan at each resolution? (issue 29, step 1)

For each ``--resolution`` x ``--phantom`` given, writes a small data set (``--n`` weak and
``--n`` strong patients, one process unless ``--jobs``) into a temporary folder and prints
seconds per scan, the mean file size of an image and of a mask per hospital, and the peak
resident memory of making one scan of each hospital (a fresh process each, so that one
figure does not carry the other's). Run it with ``OMP_NUM_THREADS=1``.

Usage: OMP_NUM_THREADS=1 python benchmarks/synth_cost.py [--n 4] [--resolutions default
clinical] [--phantoms scaled realistic] [--jobs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lymphdx.data.synthetic import SynthSpec, write_synthetic

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent's fork
_ONE_SCAN = """
import re, sys, time
from pathlib import Path
from lymphdx.data.synthetic import make_scan, patient_rng
t = time.perf_counter()
scan = make_scan(patient_rng(0, "strong", 0), sys.argv[1], True, phantom=sys.argv[2],
                 resolution=sys.argv[3])
kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(time.perf_counter() - t, kib / 1024, scan.hu.shape)
"""


def one_scan(hospital: str, phantom: str, resolution: str) -> dict:
    """Seconds and peak RSS (MiB, the whole Python process, imports included) of one
    ``make_scan`` in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _ONE_SCAN, hospital, phantom, resolution],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split(maxsplit=2)
    return {
        "seconds": round(float(out[0]), 2),
        "peak_rss_mib": round(float(out[1])),
        "shape": out[2].strip(),
    }


def mean_mib(paths: list[Path]) -> float:
    return round(sum(p.stat().st_size for p in paths) / max(1, len(paths)) / 2**20, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4, help="patients per set")
    ap.add_argument("--resolutions", nargs="+", default=["default", "clinical"])
    ap.add_argument("--phantoms", nargs="+", default=["scaled", "realistic"])
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    report = {}
    for resolution in args.resolutions:
        for phantom in args.phantoms:
            spec = SynthSpec(
                n_weak=args.n, n_strong=args.n, seed=0, resolution=resolution, phantom=phantom
            )
            with tempfile.TemporaryDirectory() as tmp:
                t = time.perf_counter()
                write_synthetic(tmp, spec, jobs=args.jobs)
                seconds = time.perf_counter() - t
                root = Path(tmp)
                files = {
                    "A_image_mib": mean_mib(sorted((root / "weak/images").glob("*.nii.gz"))),
                    "A_mask_mib": mean_mib(sorted((root / "weak_truth/masks").glob("*.nii.gz"))),
                    "B_image_mib": mean_mib(sorted((root / "strong/images").glob("*.nii.gz"))),
                    "B_mask_mib": mean_mib(sorted((root / "strong/masks").glob("*.nii.gz"))),
                }
                grids = json.loads((root / "synth.json").read_text())["grids"]
            report[f"{resolution}/{phantom}"] = {
                "scans": 2 * args.n,
                "jobs": args.jobs,
                "seconds_per_scan_written": round(seconds / (2 * args.n), 2),
                **files,
                "grids": grids,
                "one_scan_A": one_scan("A", phantom, resolution),
                "one_scan_B": one_scan("B", phantom, resolution),
            }
            print(
                json.dumps({f"{resolution}/{phantom}": report[f"{resolution}/{phantom}"]}),
                flush=True,
            )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
