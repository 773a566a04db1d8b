#!/usr/bin/env bash
# Issue 13's measurements of whether the models learn (BENCHMARKS.md §1.2-1.4 and §3.1;
# the development rounds: docs/dev-log-2026-11-25_to_2026-12-03.md §7).
# Usage: benchmarks/issue13_learning.sh OUT PHASE   with PHASE one of
#   data   synthetic seeds 0, 1, 2 (default knobs) and the harder variants of seed 0
#   dev    the quick preset's choices by 3-fold CV on seed 0's train + val patients only
#          (the fixed split's test patients held out): attention vs the paper's avgmax
#          pooling (supervised, multitask), the fixed budget vs pooled-val selection, the
#          ROI-evidence skip (multitask) and ssmdmt's pseudo-label threshold
#   cv0    all four strategies, --cv 5 --repeats 2, default data (seed 0)
#   seeds  supervised and the best ROI strategy, --cv 5 --repeats 1, synth seeds 1 and 2
#   shift  supervised and both ROI strategies on the fixed split of harder data
#          (SHIFT_DATA="d0_shift2" to run one of the two data sets)
#   dev_small  propagation.skip_one_class by 3-fold CV on the small-node data's train + val
#   dev_tta    evaluation.tta_flip, read from the dev phase's runs (no training)
#   dev_budget multitask and ssmdmt with 14 epochs instead of 10 on seed 0's dev folds
#              (run dev first)
#   dev_small_budget  small-node data's train + val: 20 epochs, or a 2.7x finer grid
#              (training.small_node_epochs; run dev_small first for its manifests)
#   dev_topk   multitask and ssmdmt, the preset against model.roi_evidence_topk: 4, on seed
#              0's dev folds (run data first)
#   dev_swa    multitask and ssmdmt with training.selection: swa (the last 5 epochs) against
#              dev_topk's dev_top1 (the preset's ema_last); dev_swa2 the same after SWA's
#              batch-norm statistics came from both hospitals' scans; dev_swa_repeat a
#              second repeat of both
#   dev_readout evaluation.roi_readout on dev_top1's finished runs (both repeats)
#   dev_preset  multitask and ssmdmt with the preset on seed 0's dev folds, both repeats
#              (what dev_top1 + dev_readout became), then
#              benchmarks/archive/readout_intensity_probe.py on them (the fourteenth round)
# RESCORE=1 before any phase scores its finished ROI runs again with the installed code
# (after a change to evaluation code that compare cannot see in the config).
# The dev phases pin what the quick preset did not yet have when they ran
# (propagation.skip_one_class and evaluation.tta_flip off), so they repeat what was run.
# Every phase uses two single-thread processes (--jobs 2) and is resumable; each prints
# its wall time and its results as JSON (benchmarks/summarise_compare.py).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: issue13_learning.sh OUT PHASE}
phase=${2:?usage: issue13_learning.sh OUT PHASE}
# the best ROI strategy: BEST, else the higher pooled OOF AUC of multitask and ssmdmt in cv0
best=${BEST:-$(python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['strategies']; print(max(('multitask','ssmdmt'), key=lambda s: r[s]['test_auc_mean']))" "$out/cv0/results.json" 2>/dev/null || echo ssmdmt)}
lx=.venv/bin/lymphdx
mkdir -p "$out"
export LYMPHDX_CACHE="$out/cache"
cmp() {  # cmp NAME DATA ARGS...: compare into $out/NAME, timed
    local name=$1 data=$2; shift 2
    local start; start=$(date +%s)
    if [ -n "${RESCORE:-}" ] && [ -d "$out/$name" ]; then
        # score the finished ROI runs again with this version's evaluation code (compare
        # only does so when the evaluation section changed), two at a time
        find "$out/$name" -name metrics.json \( -path '*/multitask/*' -o -path '*/ssmdmt/*' \) \
            -printf '%h\n' | OMP_NUM_THREADS=1 xargs -P 2 -I{} sh -c "$lx evaluate {} >/dev/null"
    fi
    $lx compare --weak "$data/weak/manifest.csv" --strong "$data/strong/manifest.csv" \
        --out "$out/$name" --jobs 2 "$@" >"$out/$name.log" 2>&1
    .venv/bin/python benchmarks/summarise_compare.py "$out/$name" --seconds $(( $(date +%s) - start ))
}
dev_data() {  # dev_data SRC DEST SPLIT: DEST's weak set = SRC's non-test weak patients
    # (the fixed split written to SPLIT); its strong set = SRC's, with absolute paths
    .venv/bin/python - "$out" "$1" "$2" "$3" <<'PY'
import csv, sys
from pathlib import Path
from lymphdx.core.config import load_config
from lymphdx.workflows.ablation import write_development_manifest
from lymphdx.engine.run_data import split_manifests
out, src, dest, split = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
weak, _ = split_manifests(load_config(), out / src / "weak/manifest.csv", out / src / "strong/manifest.csv", out / split)
for d in ("weak", "strong"):
    (out / dest / d).mkdir(parents=True, exist_ok=True)
write_development_manifest([w for w in weak if w.split != "test"], out / dest / "weak/manifest.csv")
strong = out / src / "strong/manifest.csv"
rows = list(csv.DictReader(open(strong)))
with open(out / dest / "strong/manifest.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({**r, "image": str((strong.parent / r["image"]).resolve()),
                    "mask": str((strong.parent / r["mask"]).resolve())})
PY
}
case $phase in
data)
    for s in 0 1 2; do [ -f "$out/d$s/weak/manifest.csv" ] || $lx synth --out "$out/d$s" --seed "$s" >/dev/null; done
    [ -f "$out/d0_shift2/weak/manifest.csv" ] || $lx synth --out "$out/d0_shift2" --seed 0 --shift 2 >/dev/null
    [ -f "$out/d0_small/weak/manifest.csv" ] || $lx synth --out "$out/d0_small" --seed 0 --node-scale 0.7 >/dev/null
    ;;
dev)
    dev_data d0 dev_data dev_split
    pin='evaluation:\n  tta_flip: false\n'  # + skip_one_class: false in each propagation section
    # 3-fold CV (67 training + validation patients a fold) of each choice. Pooling, with
    # every epoch's weights kept: --pooled-selection also scores selection on the pooled
    # validation folds against the fixed budget (the EMA weights at the last epoch)
    printf 'model:\n  pool: avgmax\n  roi_evidence: off\n  malignancy_map: false\n'"$pin" >"$out/dev_avgmax.yaml"
    printf 'model:\n  roi_evidence: off\n  malignancy_map: false\n'"$pin" >"$out/dev_attention.yaml"
    for pool in attention avgmax; do
        cmp "dev_$pool" "$out/dev_data" --cv 3 --repeats 1 --strategies multitask \
            --strategies supervised --pooled-selection --config "$out/dev_$pool.yaml"
    done
    # the ROI-evidence skip: detached, trained (chosen), trained through an attention head
    printf 'model:\n  roi_evidence: detached\n  malignancy_map: false\n'"$pin" >"$out/dev_evD.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: false\n'"$pin" >"$out/dev_evT.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: false\n  attention_head: true\n'"$pin" >"$out/dev_evTH.yaml"
    for v in evD evT evTH; do
        cmp "dev_$v" "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --config "$out/dev_$v.yaml"
    done
    # the malignancy map (the classifier reads a second decoder map; the ROI map learns
    # from masks, and the label reaches the shared features at 1, 0, 0.2 or 0.1 (chosen) of
    # its gradient)
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: true\n  malignancy_grad: 1.0\n'"$pin" >"$out/dev_evTM.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: true\n  malignancy_grad: 0.0\n'"$pin" >"$out/dev_evTM0.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: true\n  malignancy_grad: 0.2\n'"$pin" >"$out/dev_evTM2.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: true\n  malignancy_grad: 0.1\n'"$pin" >"$out/dev_evTM1.yaml"
    for v in evTM evTM0 evTM2 evTM1; do
        cmp "dev_$v" "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --config "$out/dev_$v.yaml"
    done
    # ssmdmt's pseudo class labels: p > 0.5 (chosen, the paper) vs prevalence-matched
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: false\npropagation:\n  skip_one_class: false\n  threshold: prevalence\n'"$pin" >"$out/dev_evTP.yaml"
    printf 'model:\n  roi_evidence: trained\n  malignancy_map: false\npropagation:\n  skip_one_class: false\n'"$pin" >"$out/dev_evT_ss.yaml"
    cmp dev_evT_ss "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_evT_ss.yaml"
    cmp dev_evTP_ss "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_evTP.yaml"
    # the same two with the malignancy map (the quick preset then: malignancy_grad 0.2)
    printf 'model:\n  malignancy_grad: 0.2\npropagation:\n  skip_one_class: false\n  threshold: prevalence\n'"$pin" >"$out/dev_evTMP.yaml"
    printf 'model:\n  malignancy_grad: 0.2\npropagation:\n  skip_one_class: false\n'"$pin" >"$out/dev_evTM2_ss.yaml"
    cmp dev_evTM2_ss "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_evTM2_ss.yaml"
    cmp dev_evTMP_ss "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_evTMP.yaml"
    ;;
cv0)
    cmp cv0 "$out/d0" --cv 5 --repeats "${REPEATS:-2}"
    ;;
seeds)
    # SEED_STRATEGIES="multitask ssmdmt": both ROI strategies beside supervised
    roi=${SEED_STRATEGIES:-$best}
    for s in 1 2; do cmp "cv_seed$s" "$out/d$s" --cv 5 --repeats 1 --strategies supervised $(printf -- '--strategies %s ' $roi); done
    ;;
shift)
    for d in ${SHIFT_DATA:-d0_shift2 d0_small}; do cmp "split_$d" "$out/$d" --seeds 1 --strategies supervised --strategies multitask --strategies ssmdmt; done
    ;;
dev_small)
    # propagation.skip_one_class, chosen by 3-fold CV of ssmdmt on the small-node data's
    # train + val patients (its test split held out); one thread per compare, side by side
    dev_data d0_small dev_small_data dev_small_split
    pin='evaluation:\n  tta_flip: false\n'
    printf 'training:\n  num_threads: 1\n  small_node_epochs: null\npropagation:\n  skip_one_class: false\n'"$pin" >"$out/dev_noskip1.yaml"
    printf 'training:\n  num_threads: 1\n  small_node_epochs: null\npropagation:\n  skip_one_class: true\n'"$pin" >"$out/dev_skip1.yaml"
    for v in noskip1 skip1; do
        [ "$v" = skip1 ] && name=dev_small_ss_skip1 || name=dev_small_ss1
        OMP_NUM_THREADS=1 cmp "$name" "$out/dev_small_data" --jobs 1 --cv 3 --repeats 1 \
            --strategies ssmdmt --config "$out/dev_$v.yaml" >"$out/$name.summary" &
    done
    wait
    ;;
dev_small_budget)
    # training.small_node_epochs: ssmdmt with twice the budget, and with a finer grid (this
    # one was stopped after its first fold in section 7.2's seventh round), against
    # dev_small's skip1 row; one thread per compare
    rest='propagation:\n  skip_one_class: true\nevaluation:\n  tta_flip: false\n'
    printf 'training:\n  num_threads: 1\n  epochs: 20\n  small_node_epochs: null\n'"$rest" >"$out/dev_long1.yaml"
    printf 'data:\n  spacing: [3.75, 3.75, 4.5]\n  shape: [64, 64, 48]\ntraining:\n  num_threads: 1\n  small_node_epochs: null\n'"$rest" >"$out/dev_fine1.yaml"
    for v in long1 fine1; do
        OMP_NUM_THREADS=1 cmp "dev_small_$v" "$out/dev_small_data" --jobs 1 --cv 3 --repeats 1 \
            --strategies ssmdmt --config "$out/dev_$v.yaml" >"$out/dev_small_$v.summary"
    done
    ;;
dev_budget)
    # a longer budget on the default data: against dev_evTM1 (the preset's multitask),
    # read with and without the flip
    printf 'training:\n  epochs: 14\nevaluation:\n  tta_flip: false\n' >"$out/dev_e14.yaml"
    cmp dev_e14 "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --config "$out/dev_e14.yaml"
    .venv/bin/python benchmarks/archive/roi_readout_probe.py "$out/dev_e14/cv/repeat0" multitask \
        --held-out-only --flip
    # ssmdmt with 10 (the preset) and 14 epochs
    printf 'evaluation:\n  tta_flip: false\n' >"$out/dev_ss10.yaml"
    cmp dev_ss10 "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_ss10.yaml"
    cmp dev_ss14 "$out/dev_data" --cv 3 --repeats 1 --strategies ssmdmt --config "$out/dev_e14.yaml"
    for v in ss10 ss14; do
        .venv/bin/python benchmarks/archive/roi_readout_probe.py "$out/dev_$v/cv/repeat0" ssmdmt \
            --held-out-only --flip
    done
    ;;
dev_topk)
    # the ROI-evidence skip reading the mean of the 4 largest malignancy logits on the
    # decoder's grid instead of the largest one; the preset (topk 1) run beside it
    [ -f "$out/dev_data/weak/manifest.csv" ] || dev_data d0 dev_data dev_split
    printf 'model:\n  roi_evidence_topk: 4\n' >"$out/dev_top4.yaml"
    cmp dev_top1 "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --strategies ssmdmt
    cmp dev_top4 "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --strategies ssmdmt \
        --config "$out/dev_top4.yaml"
    ;;
dev_swa)
    # the uniform average of the last 5 epochs' weights (batch-norm statistics recomputed
    # on the weak training scans) instead of the EMA at the end; training is the same
    [ -f "$out/dev_data/weak/manifest.csv" ] || dev_data d0 dev_data dev_split
    printf 'training:\n  selection: swa\n  swa_epochs: 5\n' >"$out/dev_swa.yaml"
    cmp dev_swa "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --strategies ssmdmt \
        --config "$out/dev_swa.yaml"
    ;;
dev_swa2)
    # the same with the batch-norm statistics recomputed on both hospitals' training scans
    # (commit "SWA: batch-norm statistics of both hospitals' scans ..."; dev_swa ran before it)
    [ -f "$out/dev_swa.yaml" ] || printf 'training:\n  selection: swa\n  swa_epochs: 5\n' >"$out/dev_swa.yaml"
    cmp dev_swa2 "$out/dev_data" --cv 3 --repeats 1 --strategies multitask --strategies ssmdmt \
        --config "$out/dev_swa.yaml"
    ;;
dev_swa_repeat)
    # a second repeat of the development folds (another 3-fold split of the same 100
    # patients) for the preset (dev_top1) and SWA with both hospitals' statistics
    # (dev_swa2); compare skips the first repeat's finished runs
    cmp dev_top1 "$out/dev_data" --cv 3 --repeats 2 --strategies multitask --strategies ssmdmt
    cmp dev_swa2 "$out/dev_data" --cv 3 --repeats 2 --strategies multitask --strategies ssmdmt \
        --config "$out/dev_swa.yaml"
    ;;
dev_readout)
    # evaluation.roi_readout scored on the preset's finished development runs (dev_top1 of
    # dev_topk and dev_swa_repeat, both repeats): compare scores them again without
    # training, since only the evaluation section differs
    [ -d "$out/dev_readout" ] || cp -r "$out/dev_top1" "$out/dev_readout"
    printf 'evaluation:\n  roi_readout: true\n' >"$out/dev_readout.yaml"
    cmp dev_readout "$out/dev_data" --cv 3 --repeats 2 --strategies multitask --strategies ssmdmt \
        --config "$out/dev_readout.yaml"
    ;;
dev_preset)
    [ -f "$out/dev_data/weak/manifest.csv" ] || dev_data d0 dev_data dev_split
    cmp dev_preset "$out/dev_data" --cv 3 --repeats 2 --strategies multitask --strategies ssmdmt
    for r in 0 1; do
        OMP_NUM_THREADS=1 .venv/bin/python benchmarks/archive/readout_intensity_probe.py \
            "$out/dev_preset/cv/repeat$r" >"$out/probe_intensity_r$r.log" 2>&1 &
    done
    wait
    tail -n 1 "$out"/probe_intensity_r*.log
    ;;
dev_tta)
    # the flip read from the dev phase's multitask and ssmdmt runs (their folds only)
    for v in evTM1:multitask evTM2:multitask evTM0:multitask evTM2_ss:ssmdmt evTMP_ss:ssmdmt; do
        echo "dev_${v%%:*} ${v##*:}"
        .venv/bin/python benchmarks/archive/roi_readout_probe.py "$out/dev_${v%%:*}/cv/repeat0" "${v##*:}" \
            --held-out-only --flip
    done
    ;;
*) echo "unknown phase $phase" >&2; exit 2 ;;
esac
