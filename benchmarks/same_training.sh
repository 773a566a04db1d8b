#!/usr/bin/env bash
# Does a change leave training unchanged? Train the same small ssmdmt run (the tiny test
# network on synthetic data, the quick preset's schedule shortened: ROI warm-up, patches,
# propagation, EMA) with two lymphdx installs and compare the checkpoints bit for bit and
# history.csv column by column (BENCHMARKS.md section 3.5).
# Usage: benchmarks/same_training.sh OLD_LYMPHDX NEW_LYMPHDX OUT
#   e.g. benchmarks/same_training.sh /work/old/.venv/bin/lymphdx .venv/bin/lymphdx /tmp/same
set -euo pipefail
old=${1:?usage: same_training.sh OLD_LYMPHDX NEW_LYMPHDX OUT}
new=${2:?usage}
out=${3:?usage}
mkdir -p "$out"
cat >"$out/cfg.yaml" <<YAML
data: {spacing: [7.5, 7.5, 12.0], shape: [32, 32, 16], cache_dir: $out/cache}
model: {init_features: 8, growth_rate: 4, block_layers: [1, 1, 1, 1], classifier_hidden: 8}
training: {epochs: 3, steps_per_epoch: 4, roi_warmup_epochs: 1, roi_patch: [16, 16, 16]}
propagation: {warmup_epochs: 2, dice_gate: 0.0}
YAML
[ -f "$out/data/weak/manifest.csv" ] || OMP_NUM_THREADS=1 "$new" synth --out "$out/data" \
    --n-weak 30 --n-pos 14 --n-strong 12 --seed 3 >/dev/null
for side in old new; do
    rm -rf "${out:?}/$side"
    bin=$old; [ "$side" = new ] && bin=$new
    OMP_NUM_THREADS=1 "$bin" train --out "$out/$side" --weak "$out/data/weak/manifest.csv" \
        --strong "$out/data/strong/manifest.csv" --strategy ssmdmt --config "$out/cfg.yaml" \
        >"$out/$side.log" 2>&1
done
"$(dirname "$new")/python" - "$out" <<'PY'
import csv, sys
from pathlib import Path
import torch
from lymphdx.engine.run_folder import load_checkpoint
out = Path(sys.argv[1])
for name in ("last.pt", "best.pt"):
    a = load_checkpoint(out / "new/checkpoints" / name)
    b = load_checkpoint(out / "old/checkpoints" / name)
    for key in ("model", "ema"):
        sa = a[key] if key == "model" else (a[key] or {}).get("model", {})
        sb = b[key] if key == "model" else (b[key] or {}).get("model", {})
        same = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        print(f"{name} {key}: {'equal bit for bit' if same else 'DIFFERENT'}")
rows = [list(csv.DictReader(open(out / side / "history.csv"))) for side in ("new", "old")]
for column in rows[0][0]:
    if column == "seconds":
        continue
    diffs = []
    for x, y in zip(*rows, strict=True):
        if x[column] != y[column]:
            try:
                diffs.append(abs(float(x[column]) - float(y[column])))
            except ValueError:
                diffs.append(float("inf"))
    if diffs:
        print(f"history.csv {column}: differs in {len(diffs)} rows, by at most {max(diffs):.3g}")
print(f"history.csv: {len(rows[0])} epochs compared")
PY
