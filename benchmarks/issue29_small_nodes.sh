#!/usr/bin/env bash
# Issue 29: does lymphdx learn where nodes are small for the quick grid? The clinical
# preset against the quick preset on the same patients (BENCHMARKS.md section 4.2).
#
#   benchmarks/issue29_small_nodes.sh OUT [phase ...]
#
# Phases (default: all, in order; each skips what is done, so the script resumes):
#   data      lymphdx synth --resolution clinical --phantom realistic --seed $SEED
#   clinical  train + evaluate the clinical preset (multitask) on the fixed split
#   longer    the same run continued to $LONG_EPOCHS epochs (train --resume on a copy)
#   quick     train + evaluate the quick preset (multitask) on the same split
#   summary   one JSON line per run: test AUC with its CI, strong/weak test Dice and FROC
#   predict512  a 512x512x256 phantom scan (0.625 x 0.625 x 0.94 mm) predicted by the
#             clinical run under /usr/bin/time -v: wall seconds and peak RSS (section 4.4)
# Environment: SEED (0), STRATEGY (multitask), LONG_EPOCHS (20), THREADS (1), and
# LYMPHDX_CACHE (default OUT/cache). One run at a time with THREADS=2, or two phases in
# parallel with THREADS=1 each (2-core machine).
set -euo pipefail
out=${1:?usage: $0 OUT [phase ...]}; shift || true
phases=${*:-data clinical longer quick summary}
seed=${SEED:-0}; strategy=${STRATEGY:-multitask}; long=${LONG_EPOCHS:-20}
export OMP_NUM_THREADS=${THREADS:-1} LYMPHDX_CACHE=${LYMPHDX_CACHE:-$out/cache}
lymphdx=${LYMPHDX:-lymphdx}
data=$out/data
mkdir -p "$out"
weak=$data/weak/manifest.csv; strong=$data/strong/manifest.csv

train_eval() {  # run_dir config_yaml [extra train args]
    local run=$1 cfg=$2; shift 2
    if [ ! -f "$run/metrics.json" ]; then
        local resume=()
        [ -f "$run/checkpoints/last.pt" ] && resume=(--resume)
        "$lymphdx" train --weak "$weak" --strong "$strong" --strategy "$strategy" \
            --config "$cfg" --out "$run" --seed "$seed" "${resume[@]}" "$@"
        "$lymphdx" evaluate "$run" > /dev/null
    fi
}

for phase in $phases; do
    case $phase in
    data)
        [ -f "$weak" ] || "$lymphdx" synth --out "$data" --resolution clinical \
            --phantom realistic --seed "$seed" --jobs "${THREADS:-1}"
        python benchmarks/node_sizes.py "$data" --spacing 1.5 ;;
    clinical)
        printf 'preset: clinical\ntraining:\n  validate_every: 1\n' > "$out/clinical.yaml"
        train_eval "$out/clinical" "$out/clinical.yaml" ;;
    longer)
        printf 'preset: clinical\ntraining:\n  validate_every: 1\n  epochs: %s\n' "$long" \
            > "$out/longer.yaml"
        if [ ! -d "$out/longer" ]; then  # the clinical run, trained on from its last epoch
            mkdir -p "$out/longer"
            cp -r "$out/clinical/." "$out/longer/"
            rm -f "$out/longer/"{metrics,detection,roi_status,roi_readout}.json \
                "$out/longer/"predictions_*.csv
        fi
        train_eval "$out/longer" "$out/longer.yaml" ;;
    quick)
        printf 'preset: quick\n' > "$out/quick.yaml"
        train_eval "$out/quick" "$out/quick.yaml" ;;
    summary)
        for run in clinical longer quick; do
            [ -f "$out/$run/metrics.json" ] || continue
            python - "$out/$run" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
m = json.loads((run / "metrics.json").read_text())
keys = ("auc", "auc_ci95", "strong_test_dice", "strong_test_froc_mean_sensitivity",
        "weak_test_dice", "weak_test_froc_mean_sensitivity")
row = {"run": run.name, "epochs": m["checkpoint"]["epochs_trained"]}
row.update({k: m.get(k) for k in keys})
row["decoder"] = m.get("roi_decoder")
row["readout"] = m.get("roi_readout", {}).get("note")
print(json.dumps(row))
PY
        done ;;
    predict512)
        [ -f "$out/full512/weak/manifest.csv" ] || "$lymphdx" synth --out "$out/full512" \
            --n-weak 2 --n-pos 1 --n-strong 0 --resolution 0.625,0.9375 \
            --phantom realistic --seed 5
        rm -rf "$out/pred512"
        /usr/bin/time -v "$lymphdx" predict --model "$out/clinical" \
            "$out/full512/weak/images/W0001.nii.gz" --out "$out/pred512" \
            2> "$out/pred512.time"
        grep -E "Elapsed|Maximum resident" "$out/pred512.time" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
done
