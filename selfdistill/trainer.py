"""The one training loop: rollout, targets or teacher scoring, loss, optimizer step.

Read top to bottom, :func:`train` is the whole run:

1. validate everything, load, let the method check what needs the model
   (SPD's probe); nothing is written before this succeeds, then the run's
   folder is made (:mod:`selfdistill.rundir`);
2. evaluate before, let the method set itself up;
3. each step: the method makes the batch (rollouts, teacher views), the loss
   is accumulated over micro-batches normalised by the global token count,
   gradients are averaged over processes, clipped, stepped;
4. log, evaluate, checkpoint (atomically) as configured;
5. write the final checkpoint, then publish the final model in Hugging Face
   format (built in a temporary folder, renamed to ``model/``), evaluate
   after, write the before/after table and the training-curve plot.

Crash safety: from the moment the folder holds ``run_config.yaml`` it is a
resumable run (``--resume true`` continues from the latest checkpoint, or from
step 0 if there is none yet) until ``model/`` and ``results.json`` make it a
finished one; every published file appears whole. SIGTERM/SIGINT in the step
loop stop at the step's end with a checkpoint; anywhere else they stop at
once, leaving that resumable state (or, before the folder exists, nothing).
Either way the process exits with 128 + signal.

Multi-process runs (``accelerate launch`` / ``torchrun``) split each global
batch across processes. As replicas (the default, and accelerate's DDP
configs) they all-reduce gradients explicitly (one flat buffer), which keeps
every method free to call sub-modules of the model. Under an accelerate FSDP
config (:mod:`selfdistill.distributed`) the student and its optimizer go
through ``accelerator.prepare`` and backward through ``accelerator.backward``;
each loss runs as a forward of the sharded model
(:func:`~selfdistill.models.sharded_forward`) and everything else that runs the
model (sampling, teachers' EMA, evaluation, saving) inside
:func:`~selfdistill.models.full_params`.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from selfdistill.atomic import publish_dir
from selfdistill.checkpoint import (latest_checkpoint, load_state, load_weights_into, rng_state,
                                    save_checkpoint, set_rng_state)
from selfdistill.config import TrainConfig
from selfdistill.config_io import ConfigError, to_dict
from selfdistill.distributed import (all_finite_sharded, full_optimizer_state, full_state_dict,
                                     load_full_optimizer_state, make_accelerator, prepare_fsdp, uses_fsdp)
from selfdistill.errors import RunInterrupted, TrainingStopped
from selfdistill.evaluate import SplitResult, evaluate, format_table, results_to_json
from selfdistill.masking import ParamMask
from selfdistill.methods.base import Context, get_method
from selfdistill.models import full_params, load_model, sharded_forward, unwrap, unwrap_ddp
from selfdistill.scoring import check_head
from selfdistill.objectives import global_token_count
from selfdistill.rundir import FolderLock
from selfdistill.runlog import HeldLog, RunLog
from selfdistill.tasks.registry import ItemStream, build_tasks


@dataclass
class RunResult:
    """What a finished run returns (also written to ``output_dir``)."""

    output_dir: Path
    before: list[SplitResult] | None
    after: list[SplitResult] | None
    steps: int
    wall_s: float
    skipped_steps: int
    stopped_by_signal: int | None = None  # SIGTERM/SIGINT number if the run stopped early to be resumed


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    o = cfg.optim

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / max(1, o.warmup_steps)
        if o.schedule == "constant":
            return 1.0
        frac = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
        return max(0.0, 1 - frac) if o.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


def _step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    """Each step reseeds sampling, so a resumed run draws what an uninterrupted one would."""
    return (cfg.seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**31 - 1)


class _Signals:
    """SIGTERM/SIGINT for a whole run (installed from the main thread; elsewhere signals are left alone).

    In the step loop (``defer``) the first signal only sets ``pending``: the loop checkpoints at the step's
    end and stops. Anywhere else (loading, the first evaluation, method setup, the final save, the last
    evaluation), and on a second signal, :class:`RunInterrupted` is raised at once, naming ``phase``.
    """

    def __init__(self) -> None:
        self.defer, self.pending, self.phase = False, None, "loading"
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame) -> None:
        if self.defer and self.pending is None:
            self.pending = signum
            return
        raise RunInterrupted(signum, self.phase)

    def __enter__(self) -> "_Signals":
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _all_reduce_grads(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Average gradients over processes with one flat all-reduce."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    pos = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[pos:pos + n].view_as(g).clone()
        pos += n


def _all_finite(params: list[torch.nn.Parameter]) -> bool:
    """Every element of every parameter is finite (one device sync for all of them)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


def _any_process(flag: bool, accelerator: Accelerator) -> bool:
    """True on every process if ``flag`` is true on any (keeps the processes in step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _sum_processes(x: float, accelerator: Accelerator) -> float:
    if accelerator.num_processes == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(t)
    return float(t.item())


class _Stepped:
    """One trained model in the loop: its parameters, optimizer, schedule, loss and token mask.

    The run's model is the first (``student``); a method's :class:`~selfdistill.methods.base.Trainee` s follow.
    Every one gets the same treatment: global-token normalisation, all-reduce, clipping, the finite check,
    its step, checkpointed state.
    """

    def __init__(self, name: str, model, cfg: TrainConfig, loss: Callable, token_mask: Callable,
                 pmask: ParamMask | None = None) -> None:
        self.name, self.model, self.loss, self.token_mask, self.pmask = name, model, loss, token_mask, pmask
        self.params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(cfg))
        self.fsdp = False

    def shard(self, accelerator: Accelerator) -> None:
        """FSDP2: the model and its optimizer through ``accelerator.prepare`` (the model is sharded in place, the
        optimizer now steps its shards; the schedule keeps driving the same optimizer)."""
        self.opt = prepare_fsdp(accelerator, self.model, self.opt)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.fsdp, self.accelerator = True, accelerator

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole state dict, gathered on the main process (every process must call it); else None
        (the model saves its own)."""
        return full_state_dict(self.accelerator, self.model) if self.fsdp else None

    def forward_backward(self, batch, cfg: TrainConfig, accelerator: Accelerator) -> tuple[float, torch.Tensor,
                                                                                          list[dict]]:
        """Accumulate the gradient of ``batch`` over micro-batches; returns (global loss, token count, infos)."""
        self.model.train()
        micro = batch.split(cfg.micro_batch_size)
        num_tokens = global_token_count([self.token_mask(m) for m in micro], accelerator)
        world, total, infos = accelerator.num_processes, 0.0, []
        for m in micro:
            with accelerator.autocast():
                if self.fsdp:  # the loss as a forward of the sharded model: full parameters, sharded gradients
                    loss, info = sharded_forward(self.model, lambda m=m: self.loss(m, num_tokens))
                else:
                    loss, info = self.loss(m, num_tokens)
            if self.fsdp:
                accelerator.backward(loss * world)  # the wrapper's reduce-scatter averages over processes
            else:
                (loss * world).backward() if world > 1 else loss.backward()
            total += float(loss.detach())
            infos.append(info)
        return _sum_processes(total, accelerator), num_tokens, infos

    def update(self, loss: float, cfg: TrainConfig, accelerator: Accelerator, step: int) -> tuple[float, bool]:
        """Average over processes, mask, clip, and step when loss and gradient are finite: (grad norm, stepped).

        Under FSDP the backward has already averaged; the norm is the global one, so the finite check (of the
        loss summed over processes and of that norm) comes out the same on every process."""
        if not self.fsdp:
            _all_reduce_grads(self.params, accelerator)
        if self.pmask is not None:
            self.pmask.grads()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        if self.fsdp:
            grad_norm = accelerator.clip_grad_norm_(self.params, clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
        if finite:
            self.opt.step()
            if self.pmask is not None:
                self.pmask.after_step()
            weights_finite = (all_finite_sharded(self.params, accelerator.device) if self.fsdp
                              else _all_finite(self.params))
            if not weights_finite:  # e.g. a huge lr: finite loss and gradient, infinite update
                raise TrainingStopped(
                    f"stopping: the update of step {step + 1} made weights non-finite although its loss and "
                    f"gradient were finite ({'' if self.name == 'student' else self.name + ', '}optim.lr="
                    f"{cfg.optim.lr}); nothing from this step is saved, earlier checkpoints are untouched; "
                    "lower --optim.lr")
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        return float(grad_norm), finite

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state: as torch keeps it, or under FSDP the whole state by parameter name, gathered on
        the main process (every process must call it then)."""
        return full_optimizer_state(self.model, self.opt) if self.fsdp else self.opt.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            load_full_optimizer_state(self.model, self.opt, state)
        else:
            self.opt.load_state_dict(state)

    def state(self, with_weights: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if with_weights:  # the run's own model is saved in Hugging Face format beside the state
            out["model"] = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return out

    def load(self, state: dict[str, Any]) -> None:
        if "model" in state:
            self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def _mean_over_processes(values: dict[str, Any], accelerator: Accelerator) -> dict[str, Any]:
    """A method's per-process statistics (reward mean, completion length, signal fraction, ...) averaged over
    processes, so the log describes the global batch, not process 0's share (non-numbers kept as they are)."""
    if accelerator.num_processes == 1:
        return values
    numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    gathered: list[dict[str, float] | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, numeric)
    out = dict(values)
    for k in numeric:
        vals = [g[k] for g in gathered if g is not None and k in g]
        out[k] = sum(vals) / len(vals)
    return out


def prepare_run(cfg: TrainConfig):
    """Validate and load everything a run needs; raises before anything is written.

    Every problem is one :class:`ConfigError` line naming the file, row and
    field or the setting (data and lookup errors are converted here, so the
    CLI prints them without a traceback).
    """
    try:
        return _prepare_run(cfg)
    except ConfigError:
        raise
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise ConfigError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e


def _prepare_run(cfg: TrainConfig):
    from selfdistill import validation
    from selfdistill.rundir import check_output_dir

    method_cls = get_method(cfg.method)  # unknown method -> clear error
    check_output_dir(cfg)  # in use, not a run, nothing to resume, resumed with other settings...
    world = int(os.environ.get("WORLD_SIZE") or 1)  # set by torchrun / accelerate launch
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    validation.check_environment(cfg)
    validation.check_distributed(cfg, method_cls)  # an accelerate FSDP / DeepSpeed config it cannot honour
    validation.check_sampler_ratio(cfg, method_cls)
    validation.check_templates(cfg, method_cls.sections)
    tasks = build_tasks(cfg.data)
    for t in tasks:
        t.items("train")  # bad data fails here, naming file/row/field
    evaluated = bool(cfg.eval_before or cfg.eval_after or cfg.eval.every)
    if evaluated:
        if not cfg.eval.splits:
            raise ConfigError("eval.splits is empty but evaluation is on; name splits or set "
                              "--eval_before false --eval_after false")
        for spec, t in zip(cfg.data.tasks, tasks):
            for split in cfg.eval.splits:
                try:
                    t.items(split)
                except KeyError as e:
                    raise ConfigError(f"data.tasks {spec!r}: {e.args[0] if e.args else e}; evaluation needs it: "
                                      "set --eval.splits or --eval_before false --eval_after false") from None
    validation.check_items(cfg, tasks, evaluated=evaluated)
    if getattr(method_cls, "requires_solution", False):
        validation.check_solutions(cfg, tasks)
    validation.check_answers(cfg, method_cls, tasks, evaluated)
    validation.check_models_and_prompts(cfg, method_cls, tasks)
    method_cls.check(cfg, tasks)  # the method's own settings and data (default: nothing)
    return method_cls, tasks


def _open_run_folder(cfg: TrainConfig, accelerator: Accelerator,
                     say: HeldLog) -> tuple[TrainConfig, RunLog, FolderLock | None]:
    """Create (or empty, or reopen) and lock the run's folder and write its record; every check has passed.

    The main process picks the folder (a fresh default name is unique), holds its lock, and tells the others.
    If even the run's record cannot be written (full disk, read-only folder, a signal), the lock is dropped
    and the folder this run made is removed. Returns the config with the real folder, the run log, the lock
    (None on other processes).
    """
    from selfdistill.rundir import RUNS, claim_output_dir, point_latest, release_output_dir

    lock = None
    try:
        if accelerator.is_main_process:
            out, made, lock = claim_output_dir(cfg)
        chosen = [(out, made) if accelerator.is_main_process else None]
    except OSError as e:
        raise ConfigError(f"output_dir {cfg.output_dir or RUNS}: cannot create it ({e.strerror or e})") from None
    runlog = None
    try:
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(chosen, src=0)
        out, made = chosen[0]
        fresh_default = not cfg.output_dir and not cfg.resume
        cfg = replace(cfg, output_dir=str(out))
        try:
            runlog = RunLog(out, cfg, is_main=accelerator.is_main_process, echo=say.echo)
        except OSError as e:
            raise ConfigError(f"output_dir {out}: cannot write the run's files ({e.strerror or e}); nothing was "
                              "written") from None
        say.attach(runlog)
        if lock is not None and lock.stale:
            say(f"note: took over the lock file {lock.path} left by pid {lock.stale}, which is no longer running")
        if fresh_default and accelerator.is_main_process:
            note = point_latest(out)
            if note:
                say(note)
    except BaseException:  # (a signal too): never leave the folder locked, nor an empty folder this run made
        if lock is not None:
            lock.release()
            if runlog is None:
                release_output_dir(out, made)
        raise
    return cfg, runlog, lock


def _write_model(folder: Path, model, tok, base_spec: str | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The final model in Hugging Face format (the adapter for a LoRA run) and its tokenizer, in ``folder``.

    An adapter names its base portably (``base_spec``: ``toy`` or a hub id as given, a local folder
    absolute), not the resolved path of this machine's package. ``state_dict``: the weights gathered from a
    sharded model (else the model's own)."""
    extra = {} if state_dict is None else {"state_dict": state_dict}
    unwrap_ddp(model).save_pretrained(folder, safe_serialization=True, **extra)
    tok.save_pretrained(folder)
    conf = folder / "adapter_config.json"
    if base_spec is not None and conf.is_file():
        import json

        from selfdistill.models import portable_base

        data = json.loads(conf.read_text())
        data["base_model_name_or_path"] = portable_base(base_spec)
        conf.write_text(json.dumps(data, indent=2) + "\n")


def _write_merged(folder: Path, adapter: Path, cfg: TrainConfig) -> None:
    """The base with the saved adapter merged in, built on the CPU from the files (no second copy of the
    training model on its device)."""
    from dataclasses import replace

    from selfdistill.models import load_model

    merged, tok = load_model(replace(cfg.model, path=str(adapter), lora=replace(cfg.model.lora, enabled=False)))
    merged.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> RunResult:
    """Run ``cfg`` end to end; see the module docstring for the order of things.

    A signal before the run's folder exists raises :class:`RunInterrupted` (nothing was written); after, the
    run stops resumable and the result says which signal (``stopped_by_signal``).
    """
    with _Signals() as signals:
        return _train(cfg, log, signals)


def _train(cfg: TrainConfig, log: Callable[[str], None] | None, signals: _Signals) -> RunResult:
    t_start = time.time()
    method_cls, tasks = prepare_run(cfg)
    accelerator = make_accelerator(cfg.mixed_precision)
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    set_seed(cfg.seed)
    model, tok = load_model(cfg.model, device=accelerator.device)
    check_head(model)  # every loss reads log-probs through selfdistill's own LM-head path
    pmask = ParamMask(model, cfg.optim.mask, cfg.optim.weight_decay) if cfg.optim.mask else None
    # Until the run's folder exists, lines are shown and kept (HeldLog): a pre-check that fails leaves nothing.
    say = HeldLog(log, is_main=accelerator.is_main_process)
    say(f"method {cfg.method}: {method_cls.summary} [{method_cls.paper}]")
    say(f"model {cfg.model.path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
        f"{world} process(es) on {accelerator.device}")
    if pmask is not None:
        say(pmask.summary())

    from selfdistill.rundir import resume_differences, resume_dir

    ckpt = latest_checkpoint(resume_dir(cfg) / "checkpoints") if cfg.resume else None
    changed = resume_differences(cfg, resume_dir(cfg)) if cfg.resume else []  # refused earlier unless forced
    system = cfg.model.system_prompt or None
    stream = ItemStream(tasks, cfg.batch_size, cfg.seed)
    ctx = Context(cfg=cfg, model=model, tokenizer=tok, tasks=tasks, accelerator=accelerator,
                  out_dir=Path(cfg.output_dir), log=say, system=system, stream=stream)
    method = method_cls(ctx)
    if ckpt is None:
        signals.phase = "the method's pre-checks"
        method.precheck()  # e.g. SPD's probe: a model that never writes an answer fails before any file
    signals.phase = "opening the run's folder"
    cfg, runlog, lock = _open_run_folder(cfg, accelerator, say)
    try:
        if changed:
            say(f"warning: --resume_force: continuing with settings that differ from the saved run's in "
                f"{', '.join(changed)}")
        if cfg.resume and ckpt is None:  # killed before its first checkpoint: the run starts again, here
            cfg = replace(cfg, resume=False)
            say(f"no checkpoint in {Path(cfg.output_dir) / 'checkpoints'} yet: starting the run again from step 0")
        return _run(cfg, ctx, method, runlog, say, signals, ckpt, t_start, pmask)
    except RunInterrupted as e:
        say(f"stopped by signal {e.signum} during {e.phase}; the run is resumable: continue with --resume true")
        accelerator.wait_for_everyone()
        last = latest_checkpoint(Path(cfg.output_dir) / "checkpoints")
        return RunResult(Path(cfg.output_dir), None, None, int(last.name.split("-")[-1]) if last else 0,
                         time.time() - t_start, 0, stopped_by_signal=e.signum)
    finally:
        if lock is not None:
            lock.release()


#: After this many steps in a row with no loss token, the run log says so (once per stretch).
NO_SIGNAL_NOTICE = 3


#: How a checkpoint's optimizer state is laid out: torch's own (replicas), or whole and by parameter name (FSDP).
LAYOUT_REPLICAS, LAYOUT_FSDP = "replicas", "fsdp-full"


def _run(cfg: TrainConfig, ctx: Context, method, runlog: RunLog, say: Callable[[str], None], signals: _Signals,
         ckpt: Path | None, t_start: float, pmask: ParamMask | None = None) -> RunResult:
    """Steps 2-5 in the run's (locked) folder: from ``ckpt``, or from step 0 when it is None."""
    model, tok, tasks, accelerator, system = ctx.model, ctx.tokenizer, ctx.tasks, ctx.accelerator, ctx.system
    rank, world = accelerator.process_index, accelerator.num_processes
    out = Path(cfg.output_dir)
    ctx.cfg, ctx.out_dir = cfg, out
    fsdp = uses_fsdp(accelerator)
    main = _Stepped("student", model, cfg, method.loss, method.token_mask, pmask)
    stepped = [main] + [_Stepped(t.name, t.model, cfg, t.loss, t.token_mask) for t in method.trainees()]
    if len({t.name for t in stepped}) < len(stepped):
        raise ValueError(f"method {cfg.method}: trainee names must be unique and not 'student'")
    sched = main.sched

    start_step, before, bad_in_row, skipped = 0, None, 0, 0
    state = load_state(ckpt) if ckpt is not None else None
    if state is not None:
        saved_layout, layout = state.get("optimizer_layout", LAYOUT_REPLICAS), LAYOUT_FSDP if fsdp else LAYOUT_REPLICAS
        if saved_layout != layout:
            raise ConfigError(f"checkpoint {ckpt}: saved by a run launched {'with' if saved_layout == LAYOUT_FSDP else 'without'} "
                              f"FSDP, and this one is launched {'with' if fsdp else 'without'} it; resume it the "
                              "way it was launched")
        load_weights_into(model, ckpt)  # into the whole model, before it is sharded
    if fsdp:
        main.shard(accelerator)
        say(f"FSDP2 through accelerate: the student and its optimizer sharded over {world} processes as one unit "
            "(embeddings and head apart); frozen teacher copies are whole on every process; checkpoints hold the "
            "full weights and the full optimizer state")
    if state is not None:
        main.load_optimizer_state(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for t in stepped[1:]:
            t.load(state["trainees"][t.name])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        start_step, skipped = state["step"], state["skipped_steps"]
        before = [SplitResult(**r) for r in state["before"]] if state.get("before") else None
        runlog.truncate_metrics(start_step)
        say(f"resumed from {ckpt} at step {start_step}")
    else:
        runlog.truncate_metrics(-1)  # (rows a killed attempt logged before its first checkpoint)
        if cfg.eval_before:
            signals.phase = "the first evaluation"
            say("evaluating before training ...")
            comp: list[dict] = []
            with full_params(model) as m:
                before = evaluate(m, tok, tasks, cfg.eval, system, completions=comp)
            runlog.eval_event(0, "before", before, comp)
            say("\n" + format_table(before))

    signals.phase = "method setup"
    with full_params(model):
        method.setup()

    def checkpoint(step: int) -> None:
        """Every process calls it (under FSDP the optimizer state and the weights are gathered); the main one
        writes."""
        opt_state, weights = main.optimizer_state(), main.full_weights()
        if not accelerator.is_main_process:
            return
        state = {"step": step, "optimizer": opt_state, "scheduler": sched.state_dict(),
                 "trainees": {t.name: t.state(with_weights=True) for t in stepped[1:]},
                 "method": method.state_dict(), "rng": rng_state(), "skipped_steps": skipped,
                 "before": results_to_json(before) if before else None, "config": to_dict(cfg)}
        if fsdp:
            state["optimizer_layout"] = LAYOUT_FSDP
        path = save_checkpoint(out / "checkpoints", step, unwrap_ddp(model), tok, state,
                               keep=cfg.keep_checkpoints, state_dict=weights)
        say(f"checkpoint {path}")

    saved_at = start_step if ckpt is not None else -1
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.method}", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    signals.phase, signals.defer = "a training step (second signal)", True
    with bar:  # closed however the loop ends, so an error prints on its own line
        empty_in_row = 0
        for step in range(start_step, cfg.steps):
            torch.manual_seed(_step_seed(cfg, step, rank))
            # 1. rollout + targets / teacher views (the method decides).
            t0 = time.perf_counter()
            ctx.step = step
            with full_params(model):  # (sampling, teacher views: whole weights; a no-op without FSDP)
                batch = method.make_batch(step, ctx.stream.for_step(step, rank, world))
            t_batch = time.perf_counter() - t0
            # 2. loss over micro-batches, normalised by each trained model's global token count.
            t1 = time.perf_counter()
            parts = {"student": batch, **batch.others}
            losses: dict[str, float] = {}
            for t in stepped:
                if t.name in parts:
                    losses[t.name], tokens, infos_t = t.forward_backward(parts[t.name], cfg, accelerator)
                    if t is main:
                        num_tokens, infos = tokens, infos_t
                else:  # a trainee with no data this step: zero gradient (its schedule still advances)
                    losses[t.name] = 0.0
            total = sum(losses.values())
            empty_in_row = empty_in_row + 1 if num_tokens == 0 else 0
            if empty_in_row == NO_SIGNAL_NOTICE:
                say(f"note: steps {step + 2 - empty_in_row}-{step + 1} carried no training signal (no token has a "
                    f"target or a teacher: e.g. {method.name} found nothing to learn from in its batch); the "
                    "model is not changing; check the method's settings or the data")
            t_fwd_bwd = time.perf_counter() - t1
            # 3. gradients, per trained model: average over processes, mask (--optim.mask), check, clip, step.
            norms, stepped_ok = {}, {}
            for t in stepped:
                norms[t.name], stepped_ok[t.name] = t.update(losses[t.name], cfg, accelerator, step)
            grad_norm, finite = norms["student"], all(stepped_ok.values())
            if finite:
                bad_in_row = 0
            else:
                skipped += 1
                bad_in_row += 1
                which = ", ".join(n for n, ok in stepped_ok.items() if not ok) if len(stepped) > 1 else ""
                say(f"step {step}: non-finite loss or gradient{f' ({which})' if which else ''}, step skipped "
                    f"({bad_in_row} in a row)")
            with full_params(model):
                method.after_step(step)
            t_update = time.perf_counter() - t1
            # 4. log, evaluate, checkpoint.
            step_info = dict(batch.info)
            for k in infos[0] if infos else []:
                # Timings add up over micro-batches; everything else is averaged.
                step_info[k] = sum(i[k] for i in infos) / (1 if k.startswith("time_") else len(infos))
            step_info = _mean_over_processes(step_info, accelerator)
            metrics: dict[str, Any] = {"step": step + 1, "loss": total, "grad_norm": float(grad_norm),
                                       "lr": sched.get_last_lr()[0], "tokens": float(num_tokens),
                                       "time_batch_s": t_batch, "time_update_s": t_update,
                                       "time_forward_backward_s": t_fwd_bwd, "time_optimizer_s": t_update - t_fwd_bwd,
                                       "skipped": not finite, **step_info}
            if len(stepped) > 1:  # per trained model: its own loss, gradient norm, and whether it was skipped
                metrics.update({f"loss_{n}": v for n, v in losses.items()})
                metrics.update({f"grad_norm_{n}": v for n, v in norms.items() if n != "student"})
                metrics.update({f"skipped_{n}": not v for n, v in stepped_ok.items() if n != "student"})
            runlog.metrics(metrics)
            if cfg.log_completions and accelerator.is_main_process:
                runlog.train_completions(step + 1, trained_texts(tok, batch, method, cfg.log_completions))
            bar.set_postfix(loss=f"{total:.4f}")
            bar.update(1)
            if bad_in_row >= cfg.max_bad_steps:
                raise TrainingStopped(f"stopping: {bad_in_row} steps in a row had a non-finite loss or gradient "
                                      f"(last at step {step + 1}, max_bad_steps={cfg.max_bad_steps}); "
                                      "lower optim.lr or check the data")
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and step + 1 < cfg.steps:
                comp = []
                with full_params(model) as m:
                    res = evaluate(m, tok, tasks, cfg.eval, system, completions=comp)
                runlog.eval_event(step + 1, "periodic", res, comp)
            stop = _any_process(signals.pending is not None, accelerator)  # a signal to one process stops all
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or stop:
                checkpoint(step + 1)
                saved_at = step + 1
            if stop:
                bar.close()
                say(f"stopped by signal after step {step + 1}; continue with --resume true")
                accelerator.wait_for_everyone()
                return RunResult(out, before, None, step + 1, time.time() - t_start, skipped,
                                 stopped_by_signal=signals.pending or signal.SIGTERM)
    signals.defer = False
    bar.close()

    # 5. final checkpoint, then the final model (so a kill never leaves the model as the only copy), evaluation
    # after, table, plot.
    signals.phase = "the final save"
    if saved_at != cfg.steps:
        checkpoint(cfg.steps)
    weights = main.full_weights()
    if accelerator.is_main_process:
        publish_dir(out / "model", lambda tmp: _write_model(tmp, model, tok, cfg.model.path, weights))
        for t in stepped[1:]:
            publish_dir(out / f"{t.name}_model", lambda tmp, t=t: _write_model(tmp, t.model, tok))
        if cfg.model.lora.enabled and cfg.model.lora.save_merged:
            publish_dir(out / "merged", lambda tmp: _write_merged(tmp, out / "model", cfg))
    after = None
    if cfg.eval_after:
        signals.phase = "the last evaluation"
        say("evaluating after training ...")
        comp = []
        with full_params(model) as m:
            after = evaluate(m, tok, tasks, cfg.eval, system, completions=comp)
        runlog.eval_event(cfg.steps, "after", after, comp)
    wall = time.time() - t_start
    signals.phase = "the run's record"
    runlog.finish(before, after, wall)
    if accelerator.is_main_process and not cfg.save_every:
        # The final checkpoint only guarded the final save and evaluation: a finished run keeps one copy of the
        # model, and optimizer state only in the checkpoints --save_every asked for.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return RunResult(out, before, after, cfg.steps, wall, skipped)


def trained_texts(tok, batch, method, limit: int) -> list[dict]:
    """The first ``limit`` (-1 = all) student sequences of ``batch`` as text: the prompt, the completion, and
    how many of its tokens carried the loss (a method's token mask may drop some, e.g. SPD's selector)."""
    s = batch.student
    n = len(batch) if limit < 0 else min(limit, len(batch))
    mask = method.token_mask(batch)
    rows = []
    for i in range(n):
        real = s.attention_mask_BT[i].bool()
        comp = s.completion_mask_BT[i].bool()
        ids = s.input_ids_BT[i]
        rows.append({"index": i, "prompt": tok.decode(ids[real & ~comp]), "completion": tok.decode(ids[comp]),
                     "loss_tokens": int(mask[i].sum())})
    return rows
