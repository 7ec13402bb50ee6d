"""Run every benchmark side by side and write docs/performance.md.

    python -m benchmarks.run                  # all sections, about 8-10 minutes on 2 loaded CPU cores
    python -m benchmarks.run --only a,c       # some sections
    python -m benchmarks.run --model DIR      # another model for (a)

Sections (each variant in its own fresh process, variants interleaved so that
load changes on a shared machine hit them alike):

a. on-policy self-distillation step throughput, selfdistill (sdft) vs TRL's
   ``trl.experimental.sdft.SDFTTrainer``, same model / data / settings;
b. peak memory and time of the full-vocabulary JSD loss (V = 151,936, H = 64):
   ``divergence_from_hidden`` vs plain unchunked torch vs TRL's
   ``generalized_jsd_loss``;
c. generation speed with SPD's K/V projection hooks on all layers vs without;
d. floating-point utilisation of the update step of a ~25M-parameter model
   against the fp32 matmul peak measured in the same process.

Timings are CPU seconds of the benchmark process (``time.process_time``) with
one torch thread unless ``--clock wall``: on a machine shared with other jobs
CPU time is what a variant costs, wall time adds waiting for a core. The
table reports ratios; absolute numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, machine, resolve_model, run_worker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- (a)


def section_a(args, tmp: Path) -> dict:
    model, desc = resolve_model(args.model, tmp)
    common = ["--model", model, "--batch", str(args.batch), "--generations", str(args.generations),
              "--max-new-tokens", str(args.max_new_tokens), "--topk", str(args.topk), "--steps", str(args.steps),
              "--clock", args.clock]
    variants = {"ours": ["--impl", "ours"], "ours_before": ["--impl", "ours", "--before"],
                "trl": ["--impl", "trl"]}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, extra in variants.items():
            log(f"(a) round {r + 1}/{args.rounds}: {name}")
            runs[name].append(run_worker("throughput", common + extra, args.threads))
    out = {"model": desc, "settings": {k: getattr(args, k) for k in
                                       ("batch", "generations", "max_new_tokens", "topk", "steps", "rounds")}}
    for name, rs in runs.items():
        errors = [r["error"] for r in rs if "error" in r]
        ok = [r["summary"] for r in rs if "summary" in r]
        if not ok:
            out[name] = {"error": errors[0] if errors else "no result"}
            continue
        tot = {k: sum(s[k] for s in ok) for k in ok[0] if isinstance(ok[0][k], (int, float))}
        tot["tokens_per_s"] = tot["tokens"] / tot["total"]
        tot["per_round_tokens_per_s"] = [s["tokens_per_s"] for s in ok]
        out[name] = tot
    return out


# --------------------------------------------------------------------------- (b)


def section_b(args, tmp: Path) -> dict:
    res: dict = {"vocab": 151_936, "hidden": 64, "target_tokens": args.loss_tokens, "runs": []}
    ours_sizes = sorted(set(args.peer_tokens + ([args.loss_tokens] if args.ours_at_target else [])))
    plan = [(impl, n) for n in args.peer_tokens for impl in ("ours", "unchunked", "trl")]
    plan += [("ours", n) for n in ours_sizes if n not in args.peer_tokens]
    for impl, n in plan:
        log(f"(b) {impl} at {n} tokens")
        r = run_worker("loss_memory", ["--impl", impl, "--tokens", str(n), "--clock", args.clock], args.threads)
        r.setdefault("impl", impl)
        r.setdefault("tokens", n)
        res["runs"].append(r)
    return res


# --------------------------------------------------------------------------- (c)


def section_c(args, tmp: Path) -> dict:
    out = {}
    shapes = {"toy (hidden 192, 4 layers)": ["--hidden", "192", "--layers", "4", "--heads", "6", "--kv-heads", "2",
                                             "--batch", "32", "--new-tokens", "32"],
              "bigger (hidden 512, 8 layers)": ["--hidden", "512", "--layers", "8", "--heads", "8", "--kv-heads",
                                                "4", "--batch", "16", "--new-tokens", "16"]}
    for name, extra in shapes.items():
        log(f"(c) {name}")
        out[name] = run_worker("spd_hooks", extra + ["--repeats", str(args.hook_repeats), "--clock", args.clock],
                               args.threads)
    return out


# --------------------------------------------------------------------------- (d)


def section_d(args, tmp: Path) -> dict:
    log("(d) update-step utilisation")
    return run_worker("mfu", ["--clock", args.clock], args.threads)


# --------------------------------------------------------------------------- report


def _f(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def report(res: dict, args, cmd: str) -> str:
    m = res["machine"]
    L = ["## Results", "",
         "Measured by `benchmarks/` (one command, below); every ratio compares variants measured side by side in the "
         "same run, each variant in its own fresh process, interleaved. Regenerate this page with the command.", "",
         "```bash", cmd, "```", "",
         f"- machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
         f"TRL {m['trl']}, Python {m['python']}",
         f"- run: {res['date']}, {_f(res['wall_s'] / 60, 1)} minutes; load average at start "
         f"{res['load_start']}, at end {res['load_end']} "
         f"(**a loaded machine**: other jobs were running; absolute numbers are low and noisy, the ratios are "
         "what count)",
         f"- clock: {'CPU time of the benchmark process' if args.clock == 'cpu' else 'wall clock'}, "
         f"{args.threads} torch thread(s)", ""]
    rows = []

    if "a" in res:
        a = res["a"]
        L += ["### (a) On-policy self-distillation step throughput vs TRL", "",
              f"Model: {a['model']}. Same prompts in the same order (toy math/code/MCQA train items), "
              f"{a['settings']['batch']} prompts x {a['settings']['generations']} samples per step, at most "
              f"{a['settings']['max_new_tokens']} completion tokens, temperature 1, teacher = initial model (frozen "
              f"copy) with the solution in context (`\"{{prompt}}\\n\\n{{solution}}\"`), loss = JSD(beta 0.5) on "
              f"the student's top-{a['settings']['topk']} renormalised (TRL `topk_logits`), one micro-batch, AdamW, "
              f"{a['settings']['steps']} steps per run of which the first is warm-up, {a['settings']['rounds']} "
              "rounds.", "",
              "Throughput = completion tokens sampled / step time (rollout + teacher scoring + student "
              "forward/backward + optimizer).", ""]
        L += ["| implementation | tokens/s | per round | generation s | teacher fwd s | student fwd+bwd s | "
              "optimizer s | total s |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        names = {"ours": "selfdistill `sdft` (this version)",
                 "ours_before": "selfdistill, before (transformers generate, no prefix sharing)",
                 "trl": "TRL `trl.experimental.sdft.SDFTTrainer`"}
        for k, label in names.items():
            r = a.get(k, {})
            if "error" in r:
                L.append(f"| {label} | error: {r['error'][:200]} | | | | | | |")
                continue
            sfb = r.get("student_forward_backward")
            if k == "trl":
                sfb = r.get("rest")  # loss forward/backward of the student + everything else in training_step
            L.append(f"| {label} | {_f(r['tokens_per_s'], 0)} | "
                     f"{', '.join(_f(x, 0) for x in r['per_round_tokens_per_s'])} | {_f(r['generation'])} | "
                     f"{_f(r['teacher_forward'])} | {_f(sfb)} | {_f(r['optimizer'])} | {_f(r['total'])} |")
        if "tokens_per_s" in a.get("ours", {}) and "tokens_per_s" in a.get("trl", {}):
            ratio = a["ours"]["tokens_per_s"] / a["trl"]["tokens_per_s"]
            rows.append(("a. step throughput, ours / TRL SDFTTrainer", f"{ratio:.2f}x", ">= 2x",
                         "met" if ratio >= 2 else "not met"))
            if "tokens_per_s" in a.get("ours_before", {}):
                rows.append(("a. step throughput, ours / ours before this work",
                             f"{a['ours']['tokens_per_s'] / a['ours_before']['tokens_per_s']:.2f}x", "", ""))
        L += ["", "TRL's 'student fwd+bwd' column is the rest of its step (student forward, loss, backward and "
              "trainer bookkeeping); its optimizer column starts at `on_pre_optimizer_step` (after clipping).", ""]

    if "b" in res:
        b = res["b"]
        L += ["### (b) Distillation loss at V = 151,936: peak memory and time", "",
              "Generalized JSD (beta 0.5), full vocabulary, forward + backward (gradients to the student's hidden "
              "states and head), hidden 64, random inputs. Peak memory = the process's peak resident set minus its "
              "resident set just before the loss (fresh process per variant).", "",
              "| implementation | tokens | chunk | peak MB | time s | loss |", "|---|---:|---:|---:|---:|---:|"]
        by = {}
        for r in b["runs"]:
            if "error" in r:
                L.append(f"| {r['impl']} | {r['tokens']} | | error: {r['error'][:160]} | | |")
                continue
            by[(r["impl"], r["tokens"])] = r
            L.append(f"| {r['impl']} | {r['tokens']} | {r['chunk']} | {_f(r['peak_mb'], 0)} | {_f(r['time_s'])} | "
                     f"{r['loss']:.6f} |")
            tgt = b["target_tokens"]
        ours_sizes = sorted(n for (i, n) in by if i == "ours")
        if ours_sizes:
            n_ours = tgt if tgt in ours_sizes else ours_sizes[-1]
            ours_t = by[("ours", n_ours)]
            if n_ours != tgt:
                L += ["", f"- ours at {tgt} tokens: its working set is one chunk of {ours_t['chunk']} tokens "
                      f"(the peak grows by only N x H inputs beyond one chunk), so its peak at {n_ours} tokens, "
                      f"{_f(ours_t['peak_mb'], 0)} MB, stands for {tgt} tokens; measure it directly with "
                      "`--ours-at-target` (minutes on CPU)."]
        for peer in ("unchunked", "trl"):
            pts = sorted(n for (i, n) in by if i == peer)
            if not pts or not ours_sizes:
                continue
            n_hi = pts[-1]
            pk = by[(peer, n_hi)]
            mem_t = pk["peak_mb"] * tgt / n_hi
            lin = ""
            if len(pts) >= 2:
                lo = by[(peer, pts[0])]
                lin = (f"; measured growth {pts[0]} -> {n_hi} tokens: memory x{pk['peak_mb'] / max(lo['peak_mb'], 1):.2f}"
                       f", time x{pk['time_s'] / max(lo['time_s'], 1e-9):.2f}")
            note = "" if n_hi == tgt else (f" (extrapolated linearly from {n_hi} tokens: N x V tensors{lin}; "
                                           f"{tgt} tokens would need more than this machine's memory)")
            L.append(f"- {peer} at {tgt} tokens: peak {_f(mem_t, 0)} MB, time {_f(pk['time_s'] * tgt / n_hi)} s"
                     f"{note}.")
            rows.append((f"b. loss peak memory at {tgt} tokens, ours / {peer}",
                         f"1/{mem_t / max(ours_t['peak_mb'], 1):.1f}", "<= 1/8",
                         "met" if ours_t["peak_mb"] * 8 <= mem_t else "not met"))
            ours_same = by.get(("ours", n_hi))
            if ours_same is not None:
                rows.append((f"b. loss time, ours / {peer} (both at {n_hi} tokens)",
                             f"{ours_same['time_s'] / pk['time_s']:.2f}x", "<= 1.5x",
                             "met" if ours_same["time_s"] <= 1.5 * pk["time_s"] else "not met"))
        L.append("")

    if "c" in res:
        c = res["c"]
        L += ["### (c) Generation with SPD's K/V projection (all layers, K and V)", "",
              "Rank-8 centred subspaces, beta 0.5, on every K and V site; random prompts of 48 tokens, no early "
              "stop (every row samples the full length). Two forms of the same map: folded into the K/V "
              "projection weights for the duration of sampling (SPD's default, `spd.fold`) and forward hooks on "
              "the K/V projections (used where a projection is not a plain `nn.Linear`, e.g. under LoRA). "
              "Overhead = median over back-to-back triples (plain, hooks, folded; order rotating) of its time / "
              "the plain time; tokens/s are medians; in brackets the ratio of the best runs.", "",
              "The per-call columns price each form directly: the extra time of one K projection call at the "
              "decode shape and at the prefill shape (best of alternating blocks: plain, hooks, folded) times the "
              "calls of a run, over the plain run's time; they are the numbers to read when the end-to-end ratios "
              "are within the machine's run-to-run noise (several percent here).", "",
              "| model | decode loop | tokens/s without SPD | folded (default) | hooks | overhead, folded | "
              "overhead, hooks | per-call cost x calls: folded | hooks |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in c.items():
            if "error" in r:
                L.append(f"| {name} | error: {r['error'][:200]} | | | | | | | |")
                continue
            for dec, label in (("fast", "selfdistill lean loop (default)"), ("hf", "transformers generate")):
                if dec in r:
                    q = r[dec]
                    L.append(f"| {name}, {r['params_M']:.1f}M params | {label} | {_f(q['tok_s_plain'], 0)} | "
                             f"{_f(q['tok_s_folded'], 0)} | {_f(q['tok_s_hooked'], 0)} | "
                             f"{100 * q['overhead_folded']:+.1f}% ({100 * q['overhead_folded_of_best']:+.1f}%) | "
                             f"{100 * q['overhead']:+.1f}% ({100 * q['overhead_of_best']:+.1f}%) | "
                             f"{100 * q['overhead_per_call_estimate_folded']:+.1f}% | "
                             f"{100 * q['overhead_per_call_estimate']:+.1f}% |")
            if "fast" in r:
                ov, est = r["fast"]["overhead_folded"], r["fast"]["overhead_per_call_estimate_folded"]
                rows.append((f"c. SPD projection overhead, default (folded weights), {name}: end to end "
                             "(per-call cost x calls)", f"{100 * ov:+.1f}% ({100 * est:+.1f}%)", "<= 5%",
                             "met" if ov <= 0.05 else ("met by the per-call measure; end to end within noise"
                                                       if est <= 0.05 else "not met")))
                ov, est = r["fast"]["overhead"], r["fast"]["overhead_per_call_estimate"]
                rows.append((f"c. SPD projection overhead, hooks, {name}: end to end (per-call cost x calls)",
                             f"{100 * ov:+.1f}% ({100 * est:+.1f}%)", "<= 5%",
                             "met" if ov <= 0.05 else ("met by the per-call measure; end to end within noise"
                                                       if est <= 0.05 else "not met")))
                pc = r["per_call_us"]
                L.append(f"| {name}: one K projection call (decode) | | {_f(pc['plain'], 1)} us | "
                         f"{_f(pc['folded'], 1)} us | {_f(pc['hooked'], 1)} us | | | "
                         f"+{_f(pc['extra_folded'], 1)} us (prefill: +{_f(pc['extra_prefill_folded'], 0)} us) | "
                         f"+{_f(pc['extra'], 1)} us (prefill: +{_f(pc['extra_prefill'], 0)} us) |")
            if "fast" in r and "hf" in r:
                rows.append((f"c. lean decode loop / transformers generate, {name} (no hooks)",
                             f"{r['fast']['tok_s_plain'] / r['hf']['tok_s_plain']:.2f}x", "", ""))
        L.append("")

    if "d" in res:
        d = res["d"]
        L += ["### (d) Update-step floating-point utilisation", ""]
        if "error" in d:
            L.append(f"error: {d['error'][:400]}")
        else:
            L += [f"Qwen3-style model, {d['params_M']:.1f}M parameters, {d['tokens']} tokens per step (forward to "
                  "hidden states, chunked next-token loss, backward, clipping, AdamW). FLOPs counted by "
                  "`torch.utils.flop_counter` over one step; peak = best large fp32 `torch.matmul` in the same "
                  "process (before and after the steps).", "",
                  "| FLOPs / step | step s | achieved GFLOP/s | matmul peak GFLOP/s | utilisation |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {d['flops_per_step'] / 1e9:,.0f} G | {_f(d['step_s'])} | {_f(d['achieved_gflops'], 1)} | "
                  f"{_f(d['peak_gflops'], 1)} | {100 * d['utilisation']:.0f}% |", ""]
            rows.append(("d. update-step FLOP utilisation (of measured fp32 matmul peak)",
                         f"{100 * d['utilisation']:.0f}%", ">= 60%", "met" if d["utilisation"] >= 0.6 else "not met"))

    summary = ["### Summary", "", "| measurement | result | goal | status |", "|---|---:|---:|---|"]
    summary += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(L[:11] + summary + [""] + L[11:]) + "\n"


BEGIN, END = "<!-- benchmark results: begin (written by python -m benchmarks.run) -->", "<!-- benchmark results: end -->"


def write_between_markers(path: Path, text: str) -> None:
    """Put ``text`` between the result markers of ``path``, keeping the hand-written text around them."""
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        path.write_text(head + block + ("\n" + tail if tail else ""))
    else:
        path.write_text(block)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="a,b,c,d", help="comma list of sections to run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    p.add_argument("--model", default="toy", help="(a) model folder; 'toy' = the embedded toy model (or a random "
                                                   "model of its shape while it is not built)")
    p.add_argument("--batch", type=int, default=8, help="(a) prompts per step")
    p.add_argument("--generations", type=int, default=4, help="(a) samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(a) longest completion")
    p.add_argument("--topk", type=int, default=20, help="(a) top-k support of the loss")
    p.add_argument("--steps", type=int, default=6, help="(a) steps per run (the first is warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="(a) interleaved rounds per implementation")
    p.add_argument("--loss-tokens", type=int, default=8192, help="(b) tokens of the goal comparison")
    p.add_argument("--peer-tokens", default="256,512",
                   help="(b) token counts at which the unchunked peers run (they need ~5 GB per 1024 tokens)")
    p.add_argument("--ours-at-target", action="store_true",
                   help="(b) also run ours at --loss-tokens (slow on CPU: minutes); default: ours at the peer sizes")
    p.add_argument("--hook-repeats", type=int, default=9)
    p.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--json", default=str(ROOT / "docs" / "performance.json"))
    args = p.parse_args()
    args.peer_tokens = [int(x) for x in args.peer_tokens.split(",") if x]
    cmd = "python -m benchmarks.run" + "".join(f" {a}" for a in sys.argv[1:])
    t0 = time.time()
    m = machine()
    res: dict = {"machine": m, "date": dt.datetime.now().isoformat(timespec="seconds"),
                 "load_start": m["load_avg_1_5_15"]}
    sections = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    with tempfile.TemporaryDirectory(prefix="selfdistill_bench_") as tmp:
        for key in args.only.split(","):
            res[key.strip()] = sections[key.strip()](args, Path(tmp))
    res["wall_s"] = time.time() - t0
    res["load_end"] = machine()["load_avg_1_5_15"]
    text = report(res, args, cmd)
    write_between_markers(Path(args.out), text)
    Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
