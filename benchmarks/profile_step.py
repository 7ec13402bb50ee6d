"""Where an on-policy self-distillation step spends its time: ``torch.profiler`` over a short ``sdft`` run.

The recipe of section (a) of ``python -m benchmarks.run`` (toy model, 8 prompts x 4 samples, at most 64
completion tokens, JSD on the student's top-20, frozen initial teacher), 4 steps, one thread; prints the
operators by self CPU time. ``--rollout-only`` profiles one rollout of the same 32 rows instead.

    python -m benchmarks.profile_step [--rollout-only] [--rows 25]
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rollout-only", action="store_true")
    p.add_argument("--rows", type=int, default=25, help="operators to print")
    a = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from selfdistill.config import TrainConfig
    from selfdistill.config_io import from_dict

    torch.set_num_threads(1)
    cfg = from_dict(TrainConfig, {
        "method": "sdft", "output_dir": tempfile.mkdtemp(prefix="profile_step_"), "seed": 0, "steps": 4,
        "batch_size": 8, "micro_batch_size": 32, "data": {"train_size": 256, "test_size": 4},
        "rollout": {"max_new_tokens": 64, "batch_size": 32, "temperature": 1.0},
        "onpolicy": {"samples_per_prompt": 4, "max_teacher_prompt_tokens": 4096},
        "sdft": {"template": "{problem}\n\n{demonstration}", "demonstration": "own"},
        "distill": {"kind": "jsd", "beta": 0.5, "topk": 20, "topk_support": "student", "tail": "renorm"},
        "teacher": {"kind": "initial"},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "eval_before": False, "eval_after": False})
    if a.rollout_only:
        from selfdistill.models import load_model
        from selfdistill.rollout import generate
        from selfdistill.sequences import chat_prompt
        from selfdistill.tasks.registry import ItemStream, build_tasks

        model, tok = load_model(cfg.model)
        model.eval()
        items = ItemStream(build_tasks(cfg.data), cfg.batch_size, cfg.seed).global_batch(0)
        prompts = [chat_prompt(tok, it.prompt) for it in items for _ in range(4)]
        generate(model, tok, prompts, cfg.rollout)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, tok, prompts, cfg.rollout)
    else:
        from selfdistill.trainer import train

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train(cfg, log=lambda s: None)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
