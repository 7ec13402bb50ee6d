#!/usr/bin/env bash
# d-OPSD's table on the toy diffusion LM (docs/methods/d_opsd.md): base, diffusion SFT, diffu-GRPO, d-OPSD,
# 3 seeds, then accuracy against optimizer steps. Finished runs are reused: rerunning continues.
set -euo pipefail
OUT=${OUT:-results/tables/d-opsd}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
selfdistill table --preset d-opsd --out "$OUT" --seeds "${SEEDS:-0,1,2}" "$@"
python scripts/dopsd_curves.py "$OUT"
