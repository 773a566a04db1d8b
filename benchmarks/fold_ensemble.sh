#!/usr/bin/env bash
# Issue 31.2: the fold ensemble of the default data's CV 5 models, scored on a fresh
# synthetic seed's patients, with a paired test against the single fold models' mean.
#
#   benchmarks/fold_ensemble.sh OUT [phase ...]
#
# Phases (default: all, in order; each skips what is done, so the script resumes):
#   data      lymphdx synth --seed 0 (the default data) into OUT/data
#   cv        lymphdx compare --cv 5 --strategies $STRATEGY into OUT/cmp (5 fold runs)
#   fresh     lymphdx synth --seed $FRESH_SEED --n-strong 0 into OUT/fresh: new patients
#             (ids W0001... again, other scans; the ensemble checks scans by content)
#   ensemble  lymphdx evaluate OUT/cmp --strategy $STRATEGY --weak OUT/fresh/...:
#             OUT/cmp/ensemble/$STRATEGY/ensemble_metrics.json
#   predict   lymphdx predict --model OUT/cmp --strategy $STRATEGY on 3 fresh scans
#   summary   one JSON line: ensemble AUC with its CI, each fold model's AUC, their mean,
#             ΔAUC with its paired bootstrap CI and DeLong's p
# Environment: STRATEGY (multitask), FRESH_SEED (7), N_FRESH (123), JOBS (1),
# THREADS (1), LYMPHDX_CACHE (default OUT/cache).
set -euo pipefail
out=${1:?usage: $0 OUT [phase ...]}; shift || true
phases=${*:-data cv fresh ensemble predict summary}
strategy=${STRATEGY:-multitask}; fresh_seed=${FRESH_SEED:-7}; n_fresh=${N_FRESH:-123}
export OMP_NUM_THREADS=${THREADS:-1} LYMPHDX_CACHE=${LYMPHDX_CACHE:-$out/cache}
lymphdx=${LYMPHDX:-lymphdx}
mkdir -p "$out"
weak=$out/data/weak/manifest.csv; strong=$out/data/strong/manifest.csv
fresh=$out/fresh/weak/manifest.csv
metrics=$out/cmp/ensemble/$strategy/ensemble_metrics.json

for phase in $phases; do
    case $phase in
    data)
        [ -f "$weak" ] || "$lymphdx" synth --out "$out/data" --seed 0 ;;
    cv)
        [ -f "$out/cmp/results.json" ] || "$lymphdx" compare --weak "$weak" --strong "$strong" \
            --out "$out/cmp" --cv 5 --strategies "$strategy" --jobs "${JOBS:-1}" ;;
    fresh)
        [ -f "$fresh" ] || "$lymphdx" synth --out "$out/fresh" --seed "$fresh_seed" \
            --n-weak "$n_fresh" --n-strong 0 ;;
    ensemble)
        [ -f "$metrics" ] || "$lymphdx" evaluate "$out/cmp" --strategy "$strategy" \
            --weak "$fresh" > /dev/null ;;
    predict)
        "$lymphdx" predict --model "$out/cmp" --strategy "$strategy" --out "$out/predict" \
            "$out"/fresh/weak/images/W000{1,2,3}.nii.gz ;;
    summary)
        python - "$metrics" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
vs = m["vs_members_mean"]
print(json.dumps({
    "n": m["n"], "n_pos": m["n_pos"], "ensemble_auc": round(m["auc"], 4),
    "ensemble_auc_ci95": [round(x, 4) for x in m["auc_ci95"]],
    "fold_auc": [round(x, 4) for x in m["members_auc"]],
    "fold_auc_mean": round(m["members_auc_mean"], 4),
    "delta_auc": round(vs["delta_auc"], 4),
    "delta_ci95_bootstrap": [round(x, 4) for x in vs["delta_ci95_bootstrap"]],
    "p_delong": vs["p_delong"],
    "calibration": m["calibration"]["method"],
    "operating_point": {k: m["operating_point"].get(k) for k in ("threshold", "sensitivity", "specificity")},
}))
PY
        ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
    esac
done
