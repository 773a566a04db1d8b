#!/usr/bin/env bash
# Times the cross-validated comparison on the default synthetic data and prints JSON
# (wall seconds, pooled results). Usage: benchmarks/archive/cv_compare.sh [OUT_DIR]
# (docs/dev-log-2026-11-25_to_2026-12-03.md, section 4). Needs the data of `make demo`
# (demo_out/data) or makes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-/tmp/lymphdx-cv52}
[ -f demo_out/data/weak/manifest.csv ] || .venv/bin/lymphdx synth --out demo_out/data >/dev/null
start=$(date +%s)
.venv/bin/lymphdx compare --weak demo_out/data/weak/manifest.csv \
    --strong demo_out/data/strong/manifest.csv --out "$out" --cv 5 --repeats 2 >"$out.log" 2>&1
total=$(( $(date +%s) - start ))
python3 - "$total" "$out" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[2]}/results.json"))
keep = ("test_auc", "test_auc_mean", "test_auc_ci95", "fold_auc_mean", "fold_auc_sd", "detection")
print(json.dumps({"seconds": int(sys.argv[1]),
                  "strategies": {s: {k: v[k] for k in keep if k in v} for s, v in r["strategies"].items()},
                  "paired_tests": {k: {x: t[x] for x in ("delta_auc", "delta_ci95", "p_delong", "power")}
                                   for k, t in r["paired_tests"].items()}}, indent=2))
PY
