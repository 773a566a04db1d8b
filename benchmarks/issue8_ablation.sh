#!/usr/bin/env bash
# Issue 8 (BENCHMARKS.md section 3.2): the ablation of the options beyond the paper, then the
# held-out confirmation of the combination it recommends. Usage:
#   benchmarks/issue8_ablation.sh [OUT_DIR] [ablation|confirm|all]   (default: all)
#
# ablation: `compare --ablation` on the default synthetic data (the data of `make demo`):
#   each option alone on top of ssmdmt, 3-fold CV x 2 repeats on the fixed split's train +
#   val patients only. Two processes of one thread each share the 2 cores (half the arms
#   each; the reference ssmdmt first in the first); a last call only summarises.
# confirm: `compare --strategies ssmdmt --strategies ssmdmt-plus --seeds 3` on the fixed
#   split (its 23 test patients, never seen by the ablation), ssmdmt-plus with the options
#   of STRATEGY_DEFAULTS (set from OUT/ablation/recommended.yaml). Checks that both folders
#   use the same fixed split. Prints JSON (wall seconds, tables in the folders' *.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-/tmp/lymphdx-issue8}")
what=${2:-all}
lx=.venv/bin/lymphdx
mkdir -p "$out"
data=$out/data
[ -f "$data/weak/manifest.csv" ] || $lx synth --out "$data" >/dev/null
printf 'data:\n  cache_dir: %s/cache\ntraining:\n  num_threads: 1\n' "$out" >"$out/config.yaml"
common=(--weak "$data/weak/manifest.csv" --strong "$data/strong/manifest.csv" --config "$out/config.yaml")

two_procs() {  # two_procs LOG_A LOG_B -- ARGS_A -- ARGS_B: run both, fail if either fails
    local la=$1 lb=$2; shift 2
    local a=() b=() side=0
    for x in "$@"; do
        if [ "$x" = "--" ]; then side=$((side + 1)); continue; fi
        if [ $side -eq 1 ]; then a+=("$x"); else b+=("$x"); fi
    done
    OMP_NUM_THREADS=1 $lx compare "${common[@]}" "${a[@]}" >"$la" 2>&1 &
    local pa=$!
    sleep 20  # the first process writes the fixed split and fills the cache first
    OMP_NUM_THREADS=1 $lx compare "${common[@]}" "${b[@]}" >"$lb" 2>&1 &
    local pb=$!
    wait $pa && wait $pb
}

ablation_s=null
if [ "$what" = all ] || [ "$what" = ablation ]; then
    start=$(date +%s)
    abl=(--ablation --out "$out/ablation" --cv 3 --repeats 2)
    two_procs "$out/ablation_a.log" "$out/ablation_b.log" \
        -- "${abl[@]}" --arms ssmdmt --arms graph-lp --arms ema-teacher --arms soft-labels \
        --arms curriculum --arms last --arms pooled-val \
        -- "${abl[@]}" --arms dsbn --arms swa --arms roi-ignore --arms roi-gate --arms tta-flip
    OMP_NUM_THREADS=1 $lx compare "${common[@]}" "${abl[@]}" >"$out/ablation_summary.log" 2>&1
    ablation_s=$(($(date +%s) - start))
fi
confirm_s=null
if [ "$what" = all ] || [ "$what" = confirm ]; then
    start=$(date +%s)
    cmp=(--out "$out/confirm" --seeds 3)
    two_procs "$out/confirm_a.log" "$out/confirm_b.log" \
        -- "${cmp[@]}" --strategies ssmdmt -- "${cmp[@]}" --strategies ssmdmt-plus
    OMP_NUM_THREADS=1 $lx compare "${common[@]}" "${cmp[@]}" --strategies ssmdmt \
        --strategies ssmdmt-plus >"$out/confirm_summary.log" 2>&1
    confirm_s=$(($(date +%s) - start))
    diff <(grep '^weak,' "$out/ablation/splits.csv") <(grep '^weak,' "$out/confirm/runs/ssmdmt/seed0/splits.csv") \
        >/dev/null || { echo "the two folders use different fixed splits" >&2; exit 1; }
fi
.venv/bin/python - "$out" "$ablation_s" "$confirm_s" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = {"ablation_seconds": json.loads(sys.argv[2]), "confirm_seconds": json.loads(sys.argv[3])}
for name, file in (("ablation", "ablation/ablation.json"), ("confirm", "confirm/results.json")):
    if (out / file).exists():
        r = json.loads((out / file).read_text())
        report[name] = {
            "auc": {s: [round(v["test_auc_mean"], 3), [round(x, 3) for x in v["test_auc_ci95"]]]
                    for s, v in r["strategies"].items()},
            "paired": {k: [round(t["delta_auc"], 3), [round(x, 3) for x in t["delta_ci95"]],
                           round(t["p_delong"], 3)] for k, t in r["paired_tests"].items()},
        }
        if "recommended" in r:
            report[name]["recommended"] = r["recommended"]
print(json.dumps(report, indent=1))
PY
