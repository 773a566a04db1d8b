#!/usr/bin/env bash
# Times `make demo` from a fresh clone (installation included) and prints JSON:
# total wall seconds, the demo's own seconds, per-strategy training seconds, peak RSS.
# Usage: benchmarks/fresh_clone_demo.sh [CLONE_DIR]   (BENCHMARKS.md §1.1, §2.1)
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dest=${1:-/tmp/lymphdx-fresh-demo}
rm -rf "$dest" && git clone -q "$repo" "$dest" && cd "$dest"
start=$(date +%s)
/usr/bin/time -v make demo >demo.log 2>&1
total=$(( $(date +%s) - start ))
python3 - "$total" <<'PY'
import csv, json, pathlib, re, sys
log = pathlib.Path("demo.log").read_text()
runs = pathlib.Path("demo_out/compare/runs")
train = {p.parent.name: round(sum(float(r["seconds"]) for r in csv.DictReader(open(p / "history.csv"))), 1)
         for p in sorted(runs.glob("*/seed0"))}
print(json.dumps({
    "make_demo_seconds": int(sys.argv[1]),
    "demo_seconds": int(re.search(r"finished in (\d+) s", log).group(1)),
    "training_seconds_seed0": train,
    "peak_rss_gib": round(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", log).group(1)) / 2**20, 2),
    "results": json.loads(pathlib.Path("demo_out/compare/results.json").read_text())["strategies"],
}, indent=2))
PY
