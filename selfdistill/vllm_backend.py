"""Optional vLLM rollouts (``rollout.backend: vllm``) for GPU users.

The training model stays the source of truth; a vLLM engine in the same
process (colocated, sharing the GPU) samples the rollouts. Before each
:func:`generate_ids` call the engine's weights are brought up to date when the
training weights changed since the last sync, which in the training loop
means once per optimizer step. Change is detected from the parameters'
in-place version counters (every optimizer step bumps them), so nothing in
the trainer has to remember to sync.

The engine is anything that follows :class:`Engine` (``generate`` on token
ids, ``load_weights`` of named tensors). :class:`VLLMEngine` wraps
``vllm.LLM`` (imported only when it is built); tests inject a fake engine
with :func:`set_engine_factory`.

Every completion comes with the engine's log-prob of each sampled token (vLLM's
``logprobs=0`` in its ``processed_logprobs`` mode): the distribution the token
was drawn from, at the sampling temperature (1 for greedy sampling), after
top-k / top-p. The engine is not the training model (its own kernels and
precision), so an importance ratio against the rollout policy takes these
(:attr:`selfdistill.rollout.Rollouts.sampler_logprobs`) rather than assuming
it is exactly 1.

Not supported by vLLM, so the in-process ``hf`` backend is used instead:
activation views (a forward hook anywhere in the model, e.g. SPD's K/V
projection) and models on the CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    """What one :meth:`Engine.generate` call samples (one completion per prompt)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class EngineOutput:
    """One sampled completion: its token ids and the engine's log-prob of each (see the module doc)."""

    token_ids: list[int]
    logprobs: list[float]


class Engine(Protocol):
    """The two calls the trainer needs from a generation engine."""

    def generate(self, prompts_token_ids: list[list[int]], params: SamplingParams) -> list[EngineOutput]:
        """One completion per prompt (generation stops at a stop token, which is included), with the
        log-prob of each sampled token under the distribution it was drawn from (the sampling temperature,
        1 when greedy; after top-k / top-p)."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace these weights of the engine (names as in the Hugging Face checkpoint).

        A sync calls it once per tensor (so a merged LoRA weight is read while it is merged and a
        full second copy of the model never has to exist); the engine must copy what it keeps.
        """
        ...


class VLLMEngine:
    """:class:`Engine` over ``vllm.LLM`` (colocated with training on the same GPU)."""

    def __init__(self, model_path: str, dtype: str = "auto", gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, seed: int = 0, **llm_kwargs) -> None:
        try:
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - needs vllm
            raise ImportError("rollout.backend=vllm needs vLLM: `pip install vllm` (GPU only), or use "
                              "rollout.backend=hf") from e
        kwargs = dict(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                      max_model_len=max_model_len, seed=seed, enable_prefix_caching=True, **llm_kwargs)
        try:  # log-probs after temperature / top-k / top-p (vLLM's default is before them)
            self.llm = LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError as e:
            if "logprobs_mode" not in str(e):
                raise
            raise ImportError("rollout.backend=vllm needs a vLLM whose LLM takes logprobs_mode (the sampled "
                              "tokens' log-probs at the sampling temperature); upgrade vllm") from e
        self._stale_prefix_cache = False

    def generate(self, prompts_token_ids: list[list[int]], params: SamplingParams) -> list[EngineOutput]:  # pragma: no cover
        from vllm import SamplingParams as VSP

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:
            TokensPrompt = dict  # older vLLM: a plain dict prompt
        sp = VSP(n=1, max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                 top_k=params.top_k if params.top_k > 0 else -1, stop_token_ids=list(params.stop_token_ids),
                 seed=params.seed, skip_special_tokens=False, logprobs=0)
        if self._stale_prefix_cache:
            self.llm.reset_prefix_cache()
            self._stale_prefix_cache = False
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts_token_ids], sampling_params=sp,
                                 use_tqdm=False)
        return [_engine_output(o.outputs[0]) for o in outs]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:  # pragma: no cover
        engine = self.llm.llm_engine
        runner = engine.model_executor.driver_worker.model_runner  # colocated engine, as TRL does
        runner.model.load_weights(list(named_tensors))
        self._stale_prefix_cache = True  # cached prefixes hold old K/V: reset before the next generate


def _engine_output(out) -> EngineOutput:  # pragma: no cover - needs vllm
    """A vLLM ``CompletionOutput`` as ids and the sampled tokens' log-probs (one {id: Logprob} per step)."""
    ids = list(out.token_ids)
    return EngineOutput(ids, [float(step[t].logprob) for t, step in zip(ids, out.logprobs)])


EngineFactory = Callable[[nn.Module, "object"], Engine]


def _default_factory(model: nn.Module, cfg) -> Engine:  # pragma: no cover - needs vllm and a GPU
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return VLLMEngine(path, dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                      seed=torch.initial_seed() % (2**31))


_factory: EngineFactory = _default_factory
# One engine per training model, with the parameter versions it was last synced at.
_engines: "weakref.WeakKeyDictionary[nn.Module, tuple[Engine, int | None]]" = weakref.WeakKeyDictionary()


def set_engine_factory(factory: EngineFactory | None) -> None:
    """Build engines with ``factory(model, sampling_cfg)`` (None: the real vLLM engine); drops cached engines."""
    global _factory
    _factory = factory or _default_factory
    _engines.clear()


def unavailable_reason() -> str | None:
    """Why ``rollout.backend vllm`` cannot run here, or None (checked before a run starts, not discovered
    mid-run as a silent fallback to ``hf``). An engine factory set for tests counts as available."""
    import importlib.util

    if _factory is not _default_factory:
        return None
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm; see docs/vllm.md)"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU and there is none here"
    return None


def usable(model: nn.Module) -> bool:
    """False when vLLM cannot reproduce the model's forward: hooks installed or weights folded (an activation
    view, see :func:`selfdistill.methods.spd.projection.fold_kv`), or no GPU model.

    A fake engine (set through :func:`set_engine_factory`) is usable on any device.
    """
    if any(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_selfdistill_kv_folded", False)
           for m in model.modules()):
        return False
    return _factory is not _default_factory or next(model.parameters()).is_cuda


def _weights_version(model: nn.Module) -> int:
    """Changes whenever any parameter is modified in place (optimizer steps, EMA, loads)."""
    return sum(p._version for p in model.parameters())


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under their checkpoint names; a LoRA adapter is merged in (and unmerged after).

    Tied weights are yielded once (vLLM ties them itself). The tensors share the
    parameters' storage: with LoRA a merged weight is only merged until the
    iteration ends, so consume (copy) each one as it comes.
    """
    peft = _is_peft(model)
    if peft:
        model.merge_adapter()
    try:
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if peft:
                if "lora_" in name or "original_module" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer", "")
                name = name.replace("modules_to_save.default.", "")
            yield name, p.detach()
    finally:
        if peft:
            model.unmerge_adapter()


def sync_weights(model: nn.Module, engine: Engine) -> None:
    """Push the model's current weights into ``engine``."""
    with torch.no_grad():
        for name, tensor in named_weights(model):
            engine.load_weights([(name, tensor)])


def engine_for(model: nn.Module, cfg) -> Engine:
    """The engine of ``model``, created on first use and synced if the weights changed since."""
    version = _weights_version(model)
    if model not in _engines:
        _engines[model] = (_factory(model, cfg), None)
    engine, synced = _engines[model]
    if synced != version:  # also on first use: the model may differ from its checkpoint (resume, SFT warm-up)
        sync_weights(model, engine)
        _engines[model] = (engine, _weights_version(model))
    return engine


def generate_ids(model: nn.Module, prompt_ids: Sequence[Sequence[int]], cfg, eos_ids: Sequence[int]
                 ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
    """Completions (cut after the first EOS, kept), whether each ended with EOS, and the engine's log-prob
    of each kept token, sampled by the engine.

    The engine's seed for this call is drawn from torch's global generator, so a
    run reseeded per step (as the trainer does) asks for the same samples again.
    """
    engine = engine_for(model, cfg)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, stop_token_ids=tuple(eos_ids),
                            seed=int(torch.randint(0, 2**31 - 1, ()).item()))
    outs = engine.generate([list(p) for p in prompt_ids], params)
    if len(outs) != len(prompt_ids):
        raise RuntimeError(f"the generation engine returned {len(outs)} completions for {len(prompt_ids)} prompts")
    eos = set(eos_ids)
    completions, finished, logprobs = [], [], []
    for out in outs:
        if not isinstance(out, EngineOutput) or len(out.logprobs) != len(out.token_ids):
            raise RuntimeError("the generation engine must return an EngineOutput per prompt, with one log-prob "
                               "per token (an importance ratio against the sampler needs them; see docs/vllm.md)")
        row = list(out.token_ids)[: cfg.max_new_tokens]
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        n = cut + 1 if cut is not None else len(row)
        completions.append(row[:n])
        logprobs.append([float(x) for x in out.logprobs[:n]])
        finished.append(cut is not None)
    return completions, finished, logprobs
