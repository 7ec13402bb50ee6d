#!/usr/bin/env bash
# The miniature results tables in docs/results.md and docs/methods/ccopd_opcod.md,
# 3 seeds each, on the toy world. Two single-threaded processes side by side
# (tiny models run faster that way on 2 cores). Finished runs are reused:
# rerunning continues where it stopped.
#
#   bash scripts/make_tables.sh                 # everything (several hours on 2 cores)
#   bash scripts/make_tables.sh feedback ccopd  # some of: spd privileged feedback ccopd opcod
set -euo pipefail
# Run folders go under results/tables (tracked: results.json, settings and logs; weights are git-ignored),
# so a later session reuses every finished run.
OUT=${OUT:-results/tables}
export OMP_NUM_THREADS=1
# The toy world's preconditions, once, printed above every table.
[ -f "$OUT/check.md" ] || selfdistill toy check --out "$OUT" || true
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(spd privileged feedback ccopd opcod)

for part in "${PARTS[@]}"; do
  case "$part" in
    spd)
      selfdistill table --preset spd --out "$OUT/spd" --rows base,ssd,spd,spd-random,spd-alltokens &
      selfdistill table --preset spd --out "$OUT/spd" --rows spd-beta0,spd-beta0.8,spd-beta0.9,spd-rank32 &
      wait
      selfdistill table --preset spd --out "$OUT/spd" --rows spd-vote,spd-keys,spd-values,spd-perhead &
      selfdistill table --preset spd --out "$OUT/spd" --rows spd-uncentred,spd-top2layers,spd-rounds2,spd-opd &
      wait
      selfdistill table --preset spd --out "$OUT/spd"
      # Why SPD's data is what it is: the projected policy's own accuracy on the valid split.
      selfdistill spd subspace --out runs/diag/rank8 --eval_betas 0,0.5,0.8,0.9,1 ;;
    privileged)
      selfdistill table --preset privileged --rows base,sft,opsd --out "$OUT/privileged" &
      selfdistill table --preset privileged --rows sdft,sdpo --out "$OUT/privileged" &
      wait
      selfdistill table --preset privileged --out "$OUT/privileged" ;;
    feedback)
      selfdistill table --preset feedback --rows base,opsd,grpo,sgsd --out "$OUT/feedback" &
      selfdistill table --preset feedback --rows critique-reward,critique-reference,critique-step \
        --out "$OUT/feedback" &
      wait
      selfdistill table --preset feedback --out "$OUT/feedback" ;;
    ccopd)
      # ccopd-allturns: one seed (a run is ~33 minutes here); base and ccopd: three.
      selfdistill ccopd table --out "$OUT/ccopd" --rows base,ccopd &
      selfdistill ccopd table --out "$OUT/ccopd" --rows ccopd-allturns --seeds 0 &
      wait
      selfdistill ccopd table --out "$OUT/ccopd" --rows base,ccopd,ccopd-allturns --seeds 0
      cp "$OUT/ccopd/results.md" "$OUT/ccopd/results_allturns_seed0.md"
      selfdistill ccopd table --out "$OUT/ccopd" --rows base,ccopd ;;
    opcod)
      selfdistill opcod make-peers --out "$OUT/peers"
      # Two seeds (a seed is seven training runs).
      selfdistill opcod table --peers "$OUT/peers" --out "$OUT/opcod" --rows base,opcod,self --seeds 0,1 &
      selfdistill opcod table --peers "$OUT/peers" --out "$OUT/opcod" --rows oneway,sft --seeds 0,1 &
      wait
      selfdistill opcod table --peers "$OUT/peers" --out "$OUT/opcod" --seeds 0,1 ;;
    *) echo "unknown part: $part (spd privileged feedback ccopd opcod)" >&2; exit 2 ;;
  esac
done
