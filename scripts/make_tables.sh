#!/usr/bin/env bash
# The miniature results tables in docs/results.md: SPD's (base, SSD, SPD and
# its ablations) and the privileged-context methods', 3 seeds each, on the toy
# world. Two single-threaded processes side by side (tiny models run faster
# that way on 2 cores). Finished runs are reused: rerunning continues.
set -euo pipefail
OUT=${OUT:-runs/tables}
export OMP_NUM_THREADS=1
selfdistill table --preset spd --rows base,ssd,spd,spd-random,spd-alltokens,spd-beta0 --out "$OUT/spd" &
selfdistill table --preset privileged --rows sft,opsd,sdft,sdpo --out "$OUT/privileged" &
wait
