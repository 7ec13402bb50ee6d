#!/usr/bin/env bash
# The miniature results tables in docs/results.md: SPD's (base, SSD, SPD and
# its ablations) and the privileged-context methods', 3 seeds each, on the toy
# world. Two single-threaded processes side by side (tiny models run faster
# that way on 2 cores). Finished runs are reused: rerunning continues.
set -euo pipefail
OUT=${OUT:-runs/tables}
export OMP_NUM_THREADS=1
selfdistill table --preset spd --out "$OUT/spd" \
  --rows base,ssd,spd,spd-random,spd-alltokens,spd-beta0,spd-beta0.8,spd-beta0.9,spd-rank32 &
selfdistill table --preset privileged --rows base,sft,opsd,sdft,sdpo --out "$OUT/privileged" &
wait
# Why SPD's data is what it is: the projected policy's own accuracy on the valid split.
selfdistill spd subspace --out runs/diag/rank8 --eval_betas 0,0.5,0.8,0.9,1
