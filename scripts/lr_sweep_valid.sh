#!/usr/bin/env bash
# The learning rate of a table's rows, chosen on `valid` (never on a test split): the table's own rows (the
# same overrides as `selfdistill table --preset $PRESET`) at each rate, 2 seeds, all 500 valid items of each
# domain, greedy. One table per rate in $OUT/$PRESET-lr<rate>; finished runs are reused.
#   bash scripts/lr_sweep_valid.sh                      # privileged: rates 1e-5 3e-5 1e-4, every row
#   bash scripts/lr_sweep_valid.sh "1e-5" "sft,opsd"
#   PRESET=spd bash scripts/lr_sweep_valid.sh "1e-5 3e-5" "base,ssd,spd"
set -euo pipefail
OUT=${OUT:-results/lr_sweep}
export OMP_NUM_THREADS=1
PRESET=${PRESET:-privileged}
ROWS=${2:-base,sft,opsd,sdft,sdpo}
for lr in ${1:-1e-5 3e-5 1e-4}; do
  d="$OUT/$PRESET-lr$lr"
  # two processes side by side (tiny models run faster that way on 2 cores), then the table of all rows
  selfdistill table --preset "$PRESET" --rows "$ROWS" --seeds 0 --common "optim.lr=$lr,eval.splits=valid,eval.samples=0" \
    --check false --out "$d" > "$d.s0.log" 2>&1 &
  selfdistill table --preset "$PRESET" --rows "$ROWS" --seeds 1 --common "optim.lr=$lr,eval.splits=valid,eval.samples=0" \
    --check false --out "$d" > "$d.s1.log" 2>&1 &
  wait
  selfdistill table --preset "$PRESET" --rows "$ROWS" --seeds 0,1 --common "optim.lr=$lr,eval.splits=valid,eval.samples=0" \
    --check false --out "$d" > "$d.log" 2>&1
done
