#!/usr/bin/env bash
# The OPD update analysis table (docs/methods/opd_analysis.md), 3 seeds on the toy world:
#   1. OPSD, GRPO and SFT at equal steps (40), and what each changed in the weights (`selfdistill analyze`);
#   2. OPSD retrained from the start on (a) all weights [= row opsd], (b) its own update mask,
#      (c) a random mask of the same density per matrix, (d) GRPO's update mask.
# Masks: the top MASK_TOP share of coordinates by |Delta| per matrix (fp32 Adam updates are dense, see the doc).
# Finished runs are reused: rerunning continues where it stopped.
#
#   bash scripts/opd_analysis_table.sh            # ~75 minutes on 2 cores
set -euo pipefail
OUT=${OUT:-results/tables/opd_analysis}
MASK_TOP=${MASK_TOP:-0.05}
SEEDS=${SEEDS:-0 1 2}
export OMP_NUM_THREADS=1
T="selfdistill table --preset opd-analysis --out $OUT"
$T --rows base,sft,opsd &
$T --rows grpo &
wait
mkdir -p "$OUT/masks" "$OUT/analysis"
for s in $SEEDS; do
  for m in opsd grpo sft; do
    [ -f "$OUT/analysis/$m-s$s/report.md" ] || \
      selfdistill analyze toy "$OUT/runs/$m-s$s" --out "$OUT/analysis/$m-s$s" --no_plots
    [ -f "$OUT/analysis/$m-s$s-bf16/analysis.json" ] || \
      selfdistill analyze toy "$OUT/runs/$m-s$s" --dtype bf16 --out "$OUT/analysis/$m-s$s-bf16" --no_plots
  done
  [ -f "$OUT/masks/opsd-s$s.safetensors" ] || \
    selfdistill analyze mask toy "$OUT/runs/opsd-s$s" --top "$MASK_TOP" --out "$OUT/masks/opsd-s$s.safetensors"
  [ -f "$OUT/masks/opsd-s$s-random.safetensors" ] || \
    selfdistill analyze mask toy "$OUT/runs/opsd-s$s" --top "$MASK_TOP" --random "$s" \
      --out "$OUT/masks/opsd-s$s-random.safetensors"
  [ -f "$OUT/masks/grpo-s$s.safetensors" ] || \
    selfdistill analyze mask toy "$OUT/runs/grpo-s$s" --top "$MASK_TOP" --out "$OUT/masks/grpo-s$s.safetensors"
  for pair in "opsd grpo" "opsd sft" "grpo sft"; do
    set -- $pair
    [ -f "$OUT/analysis/compare-$1-$2-s$s.json" ] || \
      selfdistill analyze compare "$OUT/runs/$1-s$s" "$OUT/runs/$2-s$s" --base toy --top "$MASK_TOP" \
        --out "$OUT/analysis/compare-$1-$2-s$s.json"
  done
done
# One run's full report with plots, for the doc.
[ -f "$OUT/analysis/opsd-s0/spectra.png" ] || selfdistill analyze toy "$OUT/runs/opsd-s0" --out "$OUT/analysis/opsd-s0"
$T --rows opsd-ownmask,opsd-randmask &
$T --rows opsd-grpomask &
wait
$T
python scripts/opd_analysis_summary.py "$OUT" > "$OUT/summary.md"
