"""How a run's processes share the work, as ``accelerate launch --config_file`` (or its environment) says.

- **Replicas** (one process; ``torchrun`` or an accelerate DDP config): every process holds the whole model;
  the trainer averages gradients itself with one flat all-reduce (what DDP does).
- **FSDP** (an accelerate config with ``distributed_type: FSDP`` and ``fsdp_version: 2``): the student and its
  optimizer go through ``accelerator.prepare`` (FSDP2 ``fully_shard``), backward through
  ``accelerator.backward``; the wrapper reduce-scatters the gradients. See :func:`prepare_fsdp` for how the
  model is sharded and why.
- **DeepSpeed** is refused, one line, before anything is written (:func:`selfdistill.validation.
  check_distributed`, with what FSDP does not support yet).

accelerate reads these settings from the environment ``accelerate launch`` exports (``ACCELERATE_USE_FSDP``,
``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``, ...). On CPU, accelerate 1.x only starts FSDP for GPU-like
devices (and ``accelerate launch --cpu`` starts one process); :func:`make_accelerator` turns the same
environment into accelerate's FSDP state for several CPU processes (gloo) started by ``torchrun``, which is
how the tests run FSDP on a machine without a GPU.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def requested(env: Mapping[str, str] = os.environ) -> str:
    """``fsdp``, ``deepspeed`` or ``replicas``: what the launcher's environment asks for."""
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "replicas"


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The run's Accelerator; with FSDP asked for on several CPU processes, in accelerate's FSDP state."""
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    if requested() == "fsdp" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        from accelerate.state import PartialState
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as accelerate does on a GPU
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def uses_fsdp(accelerator: Any) -> bool:
    """True when the trained models are sharded with FSDP2 (several processes, FSDP asked for)."""
    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP and accelerator.is_fsdp2


def prepare_fsdp(accelerator: Accelerator, model: torch.nn.Module,
                 opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Shard ``model`` in place with its optimizer through ``accelerator.prepare``; returns the optimizer.

    The model is sharded as one unit (the config's auto-wrap policy is set aside; accelerate still gives the
    embeddings and the head their own unit). Why: methods call sub-modules (the decoder, shared-prefix layouts
    that run a layer twice, teacher views, K/V hooks), so two processes may run their layers a different
    number of times; per-layer units would then pair up different all-gathers and reduce-scatters across
    processes. With one unit every process gathers once per micro-batch (:func:`selfdistill.models.
    sharded_forward`) and reduce-scatters once per backward, whatever the method does in between. Parameters,
    gradients and optimizer state are sharded between steps; a micro-batch holds the full parameters.
    """
    accelerator.state.fsdp_plugin.auto_wrap_policy = None
    prepared, opt_prepared = accelerator.prepare(model, opt)
    if prepared is not model:  # FSDP2 shards in place; every reference the method holds stays valid
        raise RuntimeError("accelerate returned another module from prepare under FSDP2; selfdistill expects "
                           "fully_shard to work in place")
    return getattr(opt_prepared, "optimizer", opt_prepared)


def all_finite_sharded(params: list[torch.nn.Parameter], device: torch.device) -> bool:
    """Every element of every (sharded) parameter is finite, agreed by all processes (each checks its shards)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    t = torch.tensor([1.0 if local else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def full_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict on the main process (every process calls; others get ``{}``).

    Gathered copies no longer share storage, so a tied weight (a tied LM head) is made one tensor again under
    each of its names: ``save_pretrained`` then drops the tie exactly as it does for the unsharded model."""
    sd = accelerator.get_state_dict(model)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in sd and first[id(p)] in sd:
            sd[name] = sd[first[id(p)]]
        first.setdefault(id(p), name)
    return sd


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter name, gathered on the main process (every process calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a :func:`full_optimizer_state` back onto this process's parameters (every process calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
