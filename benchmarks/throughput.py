"""(a) On-policy self-distillation step throughput: selfdistill (sdft) vs TRL's SDFTTrainer.

Both run the same recipe on the same model, the same prompts in the same
order, with the same settings:

- student prompt = the toy item's prompt through the chat template; teacher
  prompt = ``"{prompt}\\n\\n{solution}"`` (TRL's default teacher template; ours
  is set to the same text), teacher = the initial model (a frozen copy);
- ``batch`` prompts per step x ``generations`` samples each, all in one
  micro-batch, at most ``max_new_tokens`` completion tokens, temperature 1;
- loss: generalized JSD (beta = alpha = 0.5) on the student's top-``topk``
  support, renormalised (TRL's ``topk_logits`` mode without tail bucket), no
  importance weighting (TRL applies it only when rollouts are reused);
- AdamW, constant learning rate, gradient clipping 1.0.

Throughput = completion tokens sampled / wall time of the step (rollout,
teacher scoring, student forward+backward, optimizer), over the steps after
the first (warm-up). Each framework runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import add_clock, apply_clock, emit

TEMPLATE_OURS = "{problem}\n\n{demonstration}"
TEMPLATE_TRL = "{prompt}\n\n{privileged_context}"


def _items(n_steps: int, batch: int, seed: int, train_size: int):
    from selfdistill.config import DataConfig
    from selfdistill.tasks.registry import ItemStream, build_tasks

    stream = ItemStream(build_tasks(DataConfig(train_size=train_size, test_size=4)), batch, seed)
    return [stream.global_batch(s) for s in range(n_steps)]


def run_ours(a: argparse.Namespace) -> dict:
    from selfdistill.config import TrainConfig
    from selfdistill.config_io import from_dict
    from selfdistill.trainer import train

    if a.before:
        from selfdistill import sequences

        sequences.forward_hidden.__defaults__ = (False,)  # share_prefixes off
    out = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    cfg = from_dict(TrainConfig, {
        "method": "sdft", "output_dir": str(out / "run"), "seed": a.seed, "steps": a.steps,
        "batch_size": a.batch, "micro_batch_size": a.batch * a.generations,
        "model": {"path": a.model}, "data": {"train_size": a.train_size, "test_size": 4},
        "rollout": {"max_new_tokens": a.max_new_tokens, "batch_size": a.batch * a.generations, "temperature": 1.0,
                    "fast_decode": not a.before},
        "onpolicy": {"samples_per_prompt": a.generations, "max_teacher_prompt_tokens": 4096},
        "sdft": {"template": TEMPLATE_OURS, "demonstration": "own"},
        "distill": {"kind": "jsd", "beta": 0.5, "topk": a.topk, "topk_support": "student", "tail": "renorm"},
        "teacher": {"kind": "initial"},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "eval_before": False, "eval_after": False,
    })
    train(cfg, log=lambda s: None)
    rows = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    steps = []
    for r in rows:
        n_tok = round(r["completion_len"] * a.batch * a.generations)
        steps.append({
            "tokens": n_tok, "total": r["time_batch_s"] + r["time_update_s"],
            "generation": r.get("time_rollout_s", float("nan")),
            "teacher_forward": r.get("time_teacher_s", float("nan")),
            "student_forward_backward": r["time_forward_backward_s"] - r.get("time_teacher_s", 0.0),
            "optimizer": r["time_optimizer_s"],
            "other": r["time_batch_s"] - r.get("time_rollout_s", 0.0),
        })
    return {"steps": steps}


def run_trl(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    try:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as e:  # pragma: no cover - reported in the table
        return {"error": f"trl.experimental.sdft not importable: {e}"}
    from selfdistill.models import load_tokenizer

    batches = _items(a.steps, a.batch, a.seed, a.train_size)
    rows = [{"prompt": [{"role": "user", "content": it.prompt}], "privileged_context": it.solution}
            for b in batches for it in b]
    ds = Dataset.from_list(rows)
    tok = load_tokenizer(a.model)
    out = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    args = SDFTConfig(
        output_dir=str(out), per_device_train_batch_size=a.batch * a.generations, gradient_accumulation_steps=1,
        num_generations=a.generations, max_completion_length=a.max_new_tokens, max_prompt_length=4096,
        temperature=1.0, top_p=1.0, top_k=0, distillation_mode="topk_logits", distillation_topk=a.topk,
        distillation_alpha=0.5, distillation_add_tail=False, distillation_is_clip=None,
        teacher_model_kind="base", teacher_prompt_template=TEMPLATE_TRL, shuffle_dataset=False,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        max_steps=a.steps, logging_steps=1, save_strategy="no", report_to=[], seed=a.seed, bf16=False,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SDFTTrainer(model=a.model, args=args, train_dataset=ds, processing_class=tok)

    timings: list[dict] = []
    cur: dict = {}

    def timed(obj, name, key, pred=None):
        fn = getattr(obj, name)

        def wrapper(*args_, **kw):
            t = time.perf_counter()
            out_ = fn(*args_, **kw)
            if pred is None or pred(args_, kw):
                cur[key] = cur.get(key, 0.0) + time.perf_counter() - t
            return out_
        setattr(obj, name, wrapper)

    teacher = trainer.teacher_model
    timed(trainer, "_generate", "generation")
    timed(trainer, "_forward_logits", "teacher_forward",
          pred=lambda args_, kw: (kw.get("model", args_[0] if args_ else None) is teacher))

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            cur.clear()
            cur["t0"] = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kw):
            cur["t_pre_opt"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            t = time.perf_counter()
            total = t - cur["t0"]
            opt = t - cur.get("t_pre_opt", t)
            n_tok = int(trainer._metrics["train"]["completions/mean_length"][-1] * a.batch * a.generations)
            gen, tf = cur.get("generation", 0.0), cur.get("teacher_forward", 0.0)
            timings.append({"tokens": n_tok, "total": total, "generation": gen, "teacher_forward": tf,
                            "optimizer": opt, "student_forward_backward": float("nan"),
                            "other": float("nan"), "rest": total - gen - tf - opt})

    trainer.add_callback(Clock())
    trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    return {"steps": timings, "trl_module": "trl.experimental.sdft.SDFTTrainer"}


def summarise(steps: list[dict], skip: int = 1) -> dict:
    """Sums over the timed steps (the first ``skip`` are warm-up)."""
    timed = steps[skip:] or steps
    tot = {k: sum(s[k] for s in timed) for k in timed[0]}
    tot["tokens_per_s"] = tot["tokens"] / tot["total"]
    tot["steps"] = len(timed)
    return tot


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    add_clock(p)
    p.add_argument("--impl", choices=["ours", "trl"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=200)
    p.add_argument("--before", action="store_true",
                   help="ours as before this work: transformers generate, one forward row per sequence")
    a = p.parse_args()
    apply_clock(a)
    import torch

    torch.set_num_threads(a.threads)
    t = time.time()
    res = run_ours(a) if a.impl == "ours" else run_trl(a)
    if "steps" in res:
        res["summary"] = summarise(res["steps"])
    res["process_wall_s"] = time.time() - t
    emit(res)


if __name__ == "__main__":
    main()
