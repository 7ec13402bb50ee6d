#!/usr/bin/env bash
# The SafeSteer table (docs/methods/safesteer.md), 3 seeds on the toy world:
#   base, steering at inference only, SafeSteer (reverse KL on the safety tokens), the same with the
#   log-ratio detached (ours), the full-vocabulary reverse KL to the same steered teacher, and SFT on
#   refusal texts; each evaluated by `selfdistill
#   safesteer eval` (refusal on forbidden requests in and out of the training categories, over-refusal on
#   harmless look-alikes, greedy accuracy on toy math/code/mcqa test_id).
# The direction and the safety tokens are found once on the base model and shared by every row.
# Finished steps are reused: rerunning continues where it stopped.
#
#   bash scripts/safesteer_table.sh            # ~40 minutes on 2 cores
set -euo pipefail
OUT=${OUT:-results/tables/safesteer}
SEEDS=${SEEDS:-0 1 2}
N=${N:-500}
THREADS=${THREADS:-2}
MODEL=${MODEL:-toy}   # the model every row starts from (a folder, a hub id, or toy = the shipped toy model)
export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT/runs" "$OUT/eval"
# Safety-token settings for a 472-token vocabulary (the paper's 200 votes / 50 kept / 1e-8 are for ~150k):
TOK="--safesteer.min_prob 1e-3 --safesteer.vote_top 10 --safesteer.num_tokens 10"
[ -f "$OUT/direction/direction.json" ] || selfdistill safesteer direction --model.path "$MODEL" --out "$OUT/direction"
[ -f "$OUT/direction/tokens.json" ] || \
  selfdistill safesteer tokens --model.path "$MODEL" --safesteer.direction "$OUT/direction" $TOK --out "$OUT/direction/tokens.json"
EVAL="selfdistill safesteer eval --data.test_size $N --eval.max_items $N"
[ -f "$OUT/eval/base.json" ] || $EVAL --model.path "$MODEL" --json_out "$OUT/eval/base.json" > /dev/null
[ -f "$OUT/eval/steer.json" ] || $EVAL --model.path "$MODEL" --steer "$OUT/direction" --json_out "$OUT/eval/steer.json" > /dev/null
# 100 harmful prompts, 8 per step x 8 samples (temperature 1), one epoch (13 steps), as the paper's recipe.
COMMON0="--model.path $MODEL --data.tasks toy-refusal --steps 13 --batch_size 8 --micro_batch_size 64 --optim.warmup_steps 1 --onpolicy.samples_per_prompt 8 --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.top_k 0 --rollout.max_new_tokens 32 --eval_before false --eval_after false
  --safesteer.direction $OUT/direction --safesteer.tokens $OUT/direction/tokens.json"
row_args() {
  case $1 in
    safesteer) echo "--method safesteer" ;;
    detached) echo "--method safesteer --safesteer.gradient ratio_detached" ;;
    full) echo "--method safesteer --safesteer.vocabulary full --distill.kind reverse_kl" ;;
    sft) echo "--method sft" ;;
  esac
}
ROWS=${ROWS:-safesteer detached full sft}
# Each row's learning rate is chosen on `valid` (seed 0): the largest refusal-minus-over-refusal.
mkdir -p "$OUT/lr"
[ -f "$OUT/lr/base.json" ] || selfdistill safesteer eval --data.test_size $N --eval.max_items $N \
  --eval.splits valid --capability "" --model.path "$MODEL" --json_out "$OUT/lr/base.json" > /dev/null
for row in $ROWS; do
  for lr in ${LRS:-1e-5 3e-5 1e-4 3e-4 1e-3}; do
    run="$OUT/lr/$row-lr$lr"
    [ -f "$run/model/config.json" ] || selfdistill train $(row_args $row) $COMMON0 --optim.lr "$lr" --seed 0 \
      --output_dir "$run" --overwrite true > "$run.log" 2>&1
    [ -f "$run.json" ] || selfdistill safesteer eval --data.test_size $N --eval.max_items $N \
      --eval.splits valid --capability "" --model.path "$run/model" --json_out "$run.json" > /dev/null
  done
done
python - "$OUT/lr" <<'PY'
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
def gain(p):
    r = json.loads(p.read_text())["refusal"]["valid"]
    return r["refusal_in"] - r["over_refusal"]
rows = {}
for p in folder.glob("*-lr*.json"):
    row, lr = p.stem.rsplit("-lr", 1)
    rows.setdefault(row, {})[lr] = gain(p)
choice = {row: max(s, key=s.get) for row, s in rows.items()}
lines = ["| row | " + " | ".join(f"lr {lr}" for lr in sorted({l for s in rows.values() for l in s}, key=float)) + " | chosen |"]
lrs = sorted({l for s in rows.values() for l in s}, key=float)
lines.append("|---|" + "---|" * (len(lrs) + 1))
for row, s in sorted(rows.items()):
    lines.append(f"| {row} | " + " | ".join(f"{s[l]:.1f}" if l in s else "" for l in lrs) + f" | {choice[row]} |")
(folder / "choice.md").write_text("Refusal minus over-refusal on valid (points; seed 0):\n\n" + "\n".join(lines)
                                  + f"\n\nbase model: {gain(folder / 'base.json'):.1f}\n")
(folder / "choice.json").write_text(json.dumps(choice, indent=1) + "\n")
PY
cat "$OUT/lr/choice.md"
for s in $SEEDS; do
  for row in $ROWS; do
    lr=$(python -c "import json; print(json.load(open('$OUT/lr/choice.json'))['$row'])")
    run="$OUT/runs/$row-lr$lr-s$s"
    [ -f "$run/model/config.json" ] || selfdistill train $(row_args $row) $COMMON0 --optim.lr "$lr" --seed "$s" \
      --output_dir "$run" --overwrite true > "$run.log" 2>&1
    [ -f "$OUT/eval/$row-lr$lr-s$s.json" ] || \
      $EVAL --model.path "$run/model" --json_out "$OUT/eval/$row-lr$lr-s$s.json" > /dev/null
  done
done
python scripts/safesteer_summary.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
