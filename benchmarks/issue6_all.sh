#!/usr/bin/env bash
# Runs every performance benchmark of BENCHMARKS.md §2.3-2.9 in sequence (about 45 min on the
# 2-core reference VM); JSON outputs and stderr logs go to OUT (default /tmp/lymphdx-bench).
# Run it on an otherwise idle machine: with 2 cores, any other load distorts the timings.
#   bash benchmarks/issue6_all.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-/tmp/lymphdx-bench}
mkdir -p "$OUT"
[ -f "$OUT/data/weak/manifest.csv" ] || $PY -m lymphdx synth --out "$OUT/data" >/dev/null
run() {  # name, command...
  local name=$1; shift
  echo "== $name $(date -u +%T) load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$OUT/progress.log"
  $PY "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
}
run flops benchmarks/flop_efficiency.py
run precision benchmarks/precision_layout.py
run scaling benchmarks/scaling.py
run throughput benchmarks/train_throughput.py --data "$OUT/data" --cache "$OUT/cache" \
  --strategies supervised semi-supervised multitask ssmdmt
run full_resolution benchmarks/full_resolution.py --cases infer train-block train-bottleneck
run monai benchmarks/monai_compare.py --data "$OUT/data" --cache "$OUT/cache"
echo "== done $(date -u +%T)" | tee -a "$OUT/progress.log"
