"""d-OPSD's table preset (``selfdistill table --preset d-opsd``): the untrained toy diffusion LM, SFT with the
masked-diffusion loss (labels), diffu-GRPO (verifier rewards) and d-OPSD, at equal optimizer steps, on the
toy world's math; every run evaluates every ``eval.every`` (20) steps, so the table's runs hold accuracy against
optimizer steps (``scripts/dopsd_table.sh`` prints those curves).

Shared settings: 96-token responses in blocks of 16 at 2 tokens per step (the toy diffusion model's
pretraining length; the paper: 256 / 32 / 2), sampling at T = 0.9 (the paper's), 8 prompts per step,
greedy evaluation on 200 items per split (a diffusion answer costs 64 full forwards: what 2 cores afford).
diffu-GRPO samples 4 answers per prompt (32 sequences per step); d-OPSD tries each prompt up to 8 times
and reuses a rollout for 4 steps (the paper's 4-8).
"""

from __future__ import annotations

from selfdistill.experiments import Preset, single_runs

COMMON = {
    "model.path": "toy-diffusion", "data.tasks": ["toy-math"], "steps": 40, "batch_size": 8,
    "micro_batch_size": 32, "optim.lr": 1e-4, "optim.warmup_steps": 2,
    "rollout.max_new_tokens": 96, "rollout.diffusion_block_length": 16, "rollout.temperature": 0.9,
    "rollout.batch_size": 32, "eval.max_new_tokens": 96, "eval.max_items": 200, "eval.samples": 0,
    "eval.batch_size": 64, "eval.every": 20,
}

ROWS = {
    "base": {},
    "diffusion-sft": {"method": "diffusion-sft"},
    "diffu-grpo": {"method": "diffu-grpo", "onpolicy.samples_per_prompt": 4},
    "d-opsd": {"method": "d-opsd"},
}


def preset() -> Preset:
    # Step 0 of every curve is the base row (the same model): the runs skip their own before-training evaluation.
    return Preset("d-opsd", single_runs(ROWS), common=dict(COMMON), top={"eval_before": False})
