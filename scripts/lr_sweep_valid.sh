#!/usr/bin/env bash
# The learning rate of the privileged table's rows, chosen on `valid` (never on a test split): each row at a
# few rates, one seed, accuracy before and after on the 500 valid items of each domain.
#   bash scripts/lr_sweep_valid.sh "sft opsd" "1e-5 3e-5"
set -euo pipefail
OUT=${OUT:-results/lr_sweep}
export OMP_NUM_THREADS=1
for m in ${1:-sft opsd}; do
  for lr in ${2:-1e-5 3e-5 1e-4}; do
    d="$OUT/$m-lr$lr"
    [ -f "$d/results.json" ] && continue
    selfdistill train --method "$m" --optim.lr "$lr" --eval.splits valid --eval.max_items 0 --eval.samples 0 \
      --output_dir "$d" --overwrite true > "$OUT/$m-lr$lr.log" 2>&1
  done
done
