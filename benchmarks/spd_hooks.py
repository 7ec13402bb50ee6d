"""(c) Generation speed with SPD's K/V projection on every layer (K and V) vs without.

Same model, same prompts, same number of tokens (no early stop), rank-8
centred subspaces with beta 0.5 on every K and V site, in both forms: folded
into the K/V weights (SPD's default, ``spd.fold``) and as forward hooks (what
LoRA-wrapped projections use). Runs come in back-to-back triples (plain,
hooks, folded; order rotating); each overhead is the median over triples of
its time / the plain time, so a load spike on the shared machine hits all
members of a triple alike. Both decode paths are measured: selfdistill's
lean loop (the default) and ``transformers`` ``generate``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from benchmarks.common import add_clock, apply_clock, emit, make_random_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    add_clock(p)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--model", default="", help="a model folder (default: random Qwen3 of the given shape)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--decoders", default="fast,hf")
    a = p.parse_args()
    apply_clock(a)
    import torch
    from transformers import AutoModelForCausalLM

    from selfdistill import fastgen
    from selfdistill.arch import kv_sites
    from selfdistill.methods.spd.projection import project_kv
    from selfdistill.methods.spd.subspace import Subspace

    torch.set_num_threads(a.threads)
    path = a.model or make_random_model(tempfile.mkdtemp(prefix="bench_spd_"), hidden=a.hidden, layers=a.layers,
                                        heads=a.heads, kv_heads=a.kv_heads)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    subs = {}
    for site in kv_sites(model):
        U = torch.linalg.qr(torch.randn(site.width, a.rank, generator=g, dtype=torch.float64))[0].float()
        subs[site.key] = Subspace(U, 0.1 * torch.randn(site.width, generator=g), torch.ones(1, a.rank), (a.rank,))
    prompts = torch.randint(5, 100, (a.batch, a.prompt_len), generator=g).tolist()
    ids = torch.tensor(prompts)
    n_tok = a.batch * a.new_tokens

    def run(decoder: str, mode: str) -> float:
        torch.manual_seed(0)
        ctx = project_kv(model, subs, beta=a.beta, fold=mode == "folded") if mode != "plain" else _null()
        t = time.perf_counter()  # entering and leaving the view (folding, restoring) count too
        with ctx, torch.no_grad():
            if decoder == "fast":
                out, _ = fastgen.sample(model, prompts, a.new_tokens, eos_ids=[])
                assert sum(len(r) for r in out) == n_tok
            else:
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, pad_token_id=0,
                               eos_token_id=None)
        return time.perf_counter() - t

    res = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6, "hidden": model.config.hidden_size,
           "layers": model.config.num_hidden_layers, "sites": len(subs), "tokens": n_tok}
    import statistics

    modes = ("plain", "hooks", "folded")
    for decoder in a.decoders.split(","):
        for m in modes:  # warm-up
            run(decoder, m)
        times: dict[str, list[float]] = {m: [] for m in modes}
        ratios: dict[str, list[float]] = {"hooks": [], "folded": []}
        for i in range(a.repeats):
            order = modes[i % 3:] + modes[:i % 3]  # rotate who goes first
            trip = {m: run(decoder, m) for m in order}
            for m in modes:
                times[m].append(trip[m])
            for m in ratios:
                ratios[m].append(trip[m] / trip["plain"])
        med = {m: statistics.median(v) for m, v in times.items()}
        res[decoder] = {"tok_s_plain": n_tok / med["plain"], "tok_s_hooked": n_tok / med["hooks"],
                        "tok_s_folded": n_tok / med["folded"],
                        "overhead": statistics.median(ratios["hooks"]) - 1.0,
                        "overhead_of_best": min(times["hooks"]) / min(times["plain"]) - 1.0,
                        "overhead_folded": statistics.median(ratios["folded"]) - 1.0,
                        "overhead_folded_of_best": min(times["folded"]) / min(times["plain"]) - 1.0,
                        "ratios": ratios}
    # Per-call cost of one K projection at the decode and prefill shapes, plain, hooked and folded in alternating
    # blocks (best block each): the extra time times the calls of a run, over the run's time = each form's
    # overhead with the run-to-run noise of a shared machine taken out (fold/restore is paid once per run and
    # is counted in the end-to-end times only).
    site = kv_sites(model)[0]
    one = {site.key: subs[site.key]}

    def block(x, mode: str, n: int) -> float:
        ctx = (project_kv(model, one, beta=a.beta, layers=[site.layer], kinds=(site.kind,), fold=mode == "folded")
               if mode != "plain" else _null())
        with ctx, torch.no_grad():
            t = time.perf_counter()
            for _ in range(n):
                site.module(x)
            return (time.perf_counter() - t) / n

    def per_call(x, n: int) -> dict[str, float]:
        for m in modes:
            block(x, m, n)
        per = {m: float("inf") for m in modes}
        for _ in range(7):
            for m in modes:
                per[m] = min(per[m], block(x, m, n))
        return per

    dec_c = per_call(torch.randn(a.batch, 1, model.config.hidden_size), 400)
    pre_c = per_call(torch.randn(a.batch, a.prompt_len, model.config.hidden_size), 20)
    res["per_call_us"] = {"plain": dec_c["plain"] * 1e6, "hooked": dec_c["hooks"] * 1e6,
                          "folded": dec_c["folded"] * 1e6}
    for m, key in (("hooks", ""), ("folded", "_folded")):
        extra_d, extra_p = max(dec_c[m] - dec_c["plain"], 0.0), max(pre_c[m] - pre_c["plain"], 0.0)
        res["per_call_us"]["extra" + key] = extra_d * 1e6
        res["per_call_us"]["extra_prefill" + key] = extra_p * 1e6
        # Every site is called once per decode step and once in the prefill (distinct prompts, all of them here).
        extra_run = len(subs) * ((a.new_tokens - 1) * extra_d + extra_p)
        for decoder in a.decoders.split(","):
            plain_run = n_tok / res[decoder]["tok_s_plain"]
            res[decoder]["overhead_per_call_estimate" + key] = extra_run / plain_run
    emit(res)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
