"""Shared helpers of the benchmarks: the model under test, the machine, subprocess workers.

Every measurement that is compared runs in its own fresh Python process
(``python -m benchmarks.<module> --worker ...``) so that peak-memory numbers
and allocator state never leak between variants; a worker prints one JSON
line prefixed with ``RESULT`` and the orchestrator collects it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "


def machine() -> dict[str, str]:
    """CPU model, core count, torch/transformers versions, current load."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_v, "python": platform.python_version(),
            "load_avg_1_5_15": load}


def make_random_model(out: str | Path, hidden: int = 192, layers: int = 4, heads: int = 6, kv_heads: int = 2,
                      intermediate: int | None = None, seed: int = 0) -> str:
    """A random Qwen3 with the toy tokenizer and the toy model's shape (by default), saved to ``out``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from selfdistill.toy.tokenizer import build_toy_tokenizer

    out = Path(out)
    if (out / "config.json").exists():
        return str(out)
    torch.manual_seed(seed)
    tok = build_toy_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=hidden // heads, max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      rope_theta=10000.0, use_cache=True)
    model = Qwen3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def resolve_model(path: str, tmp: str | Path) -> tuple[str, str]:
    """(folder, description): ``toy`` is the embedded model, or a random toy-shaped Qwen3 if it is missing."""
    if path in ("toy", ""):
        from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR

        if (DEFAULT_MODEL_DIR / "config.json").exists():
            return str(DEFAULT_MODEL_DIR), "embedded toy model (selfdistill/toy/model)"
        folder = make_random_model(Path(tmp) / "toy_random")
        return folder, ("random Qwen3 of the toy model's shape (hidden 192, 4 layers, 6 heads, 2 KV heads; "
                        "the embedded toy model was not built yet)")
    return path, path


def run_worker(module: str, args: list[str], threads: int, timeout: float = 600) -> dict:
    """Run ``python -m benchmarks.<module> --worker args`` in a fresh process; its RESULT line as a dict."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--worker", "--threads", str(threads), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            return json.loads(line[len(PREFIX):])
    tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-3000:]).strip()
    return {"error": f"exit {proc.returncode}: {tail}"}


def add_clock(parser) -> None:
    """``--clock cpu|wall`` for a worker (see :func:`apply_clock`)."""
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")


def apply_clock(args) -> None:
    """With ``--clock cpu`` every ``time.perf_counter`` in this process (ours, TRL's, the worker's) reads the
    process's CPU time, so waiting for a core on a shared machine is not counted."""
    import time

    if getattr(args, "clock", "wall") == "cpu":
        time.perf_counter = time.process_time


def emit(result: dict) -> None:
    """What a worker prints last: one JSON line the orchestrator reads."""
    print(PREFIX + json.dumps(result), flush=True)
