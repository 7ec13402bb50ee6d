"""(d) Floating-point utilisation of the update step against this machine's fp32 matmul peak.

The update step of every method: the student's forward to hidden states
(:func:`selfdistill.sequences.forward_hidden`), the chunked next-token loss
through the LM head, backward, gradient clipping and an AdamW step, on a
~25M-parameter Qwen3-style model (hidden 512, 8 layers, GQA 8/4 heads,
MLP 1536; toy vocabulary) and ``batch x length`` tokens.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one
step (matrix products and attention: the usual model-FLOPs convention;
elementwise work is not counted but its time is). The peak is the best of
several large ``torch.matmul`` calls (``--peak-n`` square, fp32) in the same
process with the same thread count, measured before and after the steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.common import add_clock, apply_clock, emit, make_random_model


def matmul_peak(n: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    add_clock(p)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--peak-n", type=int, default=2048)
    a = p.parse_args()
    apply_clock(a)
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM

    from selfdistill.scoring import next_token_loss
    from selfdistill.sequences import make_batch

    torch.set_num_threads(a.threads)
    peak_before = matmul_peak(a.peak_n)
    path = make_random_model(tempfile.mkdtemp(prefix="bench_mfu_"), hidden=a.hidden, layers=a.layers,
                             heads=a.heads, kv_heads=a.kv_heads, intermediate=a.intermediate)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    prompt = a.length // 4
    prompts = torch.randint(5, 100, (a.batch, prompt), generator=g).tolist()
    comps = torch.randint(5, 100, (a.batch, a.length - prompt), generator=g).tolist()
    batch = make_batch(prompts, comps, pad_id=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    n_tok = batch.num_completion_tokens

    def step() -> None:
        loss, _ = next_token_loss(model, batch, n_tok)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocates the optimizer state)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak_after = matmul_peak(a.peak_n)
    peak = max(peak_before, peak_after)
    best = min(times)
    emit({"params_M": n_params / 1e6, "tokens": a.batch * a.length, "flops_per_step": flops,
          "step_s": best, "step_times": times, "achieved_gflops": flops / best / 1e9,
          "peak_gflops": peak / 1e9, "peak_before_gflops": peak_before / 1e9, "peak_after_gflops": peak_after / 1e9,
          "utilisation": flops / best / peak})


if __name__ == "__main__":
    main()
