"""(b) Peak memory and time of the distillation loss at a real vocabulary.

Generalized JSD (beta 0.5, full vocabulary, temperature 1) between a student
and a teacher, from last hidden states (N tokens x H) and LM-head weights
(V x H), forward and backward (gradients to the student's hidden states and
head), three implementations:

- ``ours``: :func:`selfdistill.objectives.divergence_from_hidden` (chunked
  over tokens, closed-form gradient, logits recomputed in backward);
- ``unchunked``: plain torch, logits materialised (N x V), autograd;
- ``trl``: ``GKDTrainer.generalized_jsd_loss`` (TRL's reference loss) on the
  materialised logits.

Each variant runs in a fresh process. Peak memory = the process's peak
resident set (``ru_maxrss``) minus its resident set just before the loss
(inputs, weights and libraries already loaded); torch's CPU allocator returns
large blocks to the OS, so this is the loss's own working memory.
"""

from __future__ import annotations

import argparse
import math
import resource
import time

from benchmarks.common import add_clock, apply_clock, emit


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    add_clock(p)
    p.add_argument("--impl", choices=["ours", "unchunked", "trl"], required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunk", type=int, default=0, help="ours: chunk size (0 = the library default)")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    apply_clock(a)
    import torch

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    N, V, H = a.tokens, a.vocab, a.hidden
    hs = (torch.randn(N, H, generator=g) * 0.5).requires_grad_(True)
    ht = torch.randn(N, H, generator=g) * 0.5
    ws = (torch.randn(V, H, generator=g) * 0.5).requires_grad_(True)
    wt = torch.randn(V, H, generator=g) * 0.5
    beta = 0.5

    if a.impl == "ours":
        from selfdistill.objectives import DivergenceConfig, divergence_from_hidden

        cfg = DivergenceConfig(kind="jsd", beta=beta, **({"chunk_size": a.chunk} if a.chunk else {}))
        chunk = cfg.chunk_size

        def loss_fn():
            return divergence_from_hidden(hs, ws, ht, wt, cfg=cfg)
    elif a.impl == "unchunked":
        chunk = N

        def loss_fn():
            ls = torch.log_softmax(hs @ ws.T, -1)
            with torch.no_grad():
                lt = torch.log_softmax(ht @ wt.T, -1)
            logm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
            jsd = beta * (lt.exp() * (lt - logm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - logm)).sum(-1)
            return jsd.mean()
    else:
        chunk = N
        from trl.experimental.gkd import GKDTrainer

        def loss_fn():
            s_logits = (hs @ ws.T)[None]
            with torch.no_grad():
                t_logits = (ht @ wt.T)[None]
            return GKDTrainer.generalized_jsd_loss(s_logits, t_logits, beta=beta, reduction="batchmean") / N

    rss0, peak0 = _rss_mb(), _peak_mb()
    t = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    first = time.perf_counter() - t
    peak = _peak_mb()
    value = float(loss)
    del loss
    times = [first]
    for _ in range(a.repeats - 1):
        hs.grad = ws.grad = None
        t = time.perf_counter()
        loss_fn().backward()
        times.append(time.perf_counter() - t)
    emit({"impl": a.impl, "tokens": N, "vocab": V, "hidden": H, "chunk": chunk, "loss": value,
          "peak_mb": max(peak - rss0, 0.0), "peak_was_below_earlier_max": peak <= peak0,
          "time_s": min(times), "times": times, "grad_norm_h": float(hs.grad.norm())})


if __name__ == "__main__":
    main()
