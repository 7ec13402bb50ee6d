"""SPD, Self-Policy Distillation (arXiv 2605.22675): the flagship.

Paper says: extract a low-rank capability subspace from the model's own
gradients on correctness-defining tokens; project K/V activations into it
during self-generation; fine-tune on the raw outputs with next-token loss; no
labels, verifier or reward. We do (details and reasons in docs/methods/spd.md):

1. probe: sample completions on unlabeled train prompts from the model;
2. mark the correctness-defining tokens by format (``spd.selector``);
3. back-propagate their NLL to every layer's K and V projection outputs and
   keep the top ``spd.rank`` directions of the stacked gradients per site;
4. sample the round's training data with the projection hooks active
   (``h -> mu + P(h - mu) + beta (I - P)(h - mu)``), no filtering;
5. fine-tune the unhooked model on it with next-token loss (shared with SSD).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors import SafetensorError

from selfdistill.arch import kv_sites
from selfdistill.config_io import ConfigError
from selfdistill.methods.base import register
from selfdistill.methods.onpolicy import OnPolicyMethod
from selfdistill.methods.selfgen import SelfGenMethod
from selfdistill.models import unwrap
from selfdistill.rollout import generate
from selfdistill.sequences import chat_prompt, make_batch
from selfdistill.methods.spd.projection import project_kv
from selfdistill.methods.spd.selectors import majority_agrees, select_tokens
from selfdistill.methods.spd.subspace import (SubspaceAccumulator, SubspaceSet, kv_gradients, layer_energy, load_subspaces,
                                      save_subspaces, top_layers)


def _parse_layers(spec: str) -> str | int | list[int]:
    """``spd.layers``: ``"all"``, ``top:N`` (returned as N) or a comma list of layer indices."""
    spec = spec.strip()
    if spec == "all":
        return "all"
    try:
        if spec.startswith("top:"):
            n = int(spec[4:])
            if n >= 1:
                return n
        else:
            layers = [int(x) for x in spec.split(",") if x.strip()]
            if layers and min(layers) >= 0:
                return layers
    except ValueError:
        pass
    raise ConfigError(f"spd.layers: cannot read {spec!r}; use all, top:N (N >= 1) or a comma list of layer "
                      "indices (0, 1, ...)")


def _layer_spec(spec: str, sset: SubspaceSet) -> Any:
    layers = _parse_layers(spec)
    return sorted(top_layers(layer_energy(sset), layers)) if isinstance(layers, int) else layers


def _torch_rng() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_torch_rng(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _load_subspace_file(path: str) -> SubspaceSet:
    """A saved subspace, or one line naming ``spd.subspace_path``."""
    if not Path(path).is_file():
        raise ConfigError(f"spd.subspace_path {path}: no such file (save one with `selfdistill spd subspace "
                          "--out DIR`)")
    try:
        return load_subspaces(path)
    except (ValueError, KeyError, OSError, SafetensorError) as e:
        raise ConfigError(f"spd.subspace_path {path}: not a readable subspace file ({e})") from None


def randomize(sset: SubspaceSet, seed: int) -> SubspaceSet:
    """The ablation: each site's basis replaced by a random orthonormal one of the same rank."""
    gen = torch.Generator().manual_seed(seed)
    subs = {}
    for key, s in sset.subspaces.items():
        q, _ = torch.linalg.qr(torch.randn(s.U_dr.shape[0], max(1, s.rank), generator=gen, dtype=torch.float64))
        subs[key] = type(s)(**{**s.__dict__, "U_dr": q[:, : s.rank].to(s.U_dr.dtype)})
    return SubspaceSet(subs, sset.rank, sset.energy, sset.per_head, sset.center, sset.model_class,
                       {**sset.extra, "random": True}, sset.key_site)


def extract_subspace(model, tokenizer, items, cfg, seed: int, system: str | None = None,
                     micro_batch: int = 16, log=print, accumulator: SubspaceAccumulator | None = None) -> SubspaceSet:
    """Steps 1-3: probe the model on unlabeled prompts, fit the K/V capability subspace.

    ``accumulator``: fill this one (the caller then has the probe's statistics, for diagnostics)."""
    s = cfg.spd
    rng = random.Random(seed)
    probe = rng.sample(items, k=min(s.probe_size, len(items)))
    prompts = [chat_prompt(tokenizer, it.prompt, system) for it in probe for _ in range(s.probe_samples)]
    probe_items = [it for it in probe for _ in range(s.probe_samples)]
    torch.manual_seed(seed)
    ro = generate(model, tokenizer, prompts, cfg.rollout, desc="SPD probe")
    acc = accumulator if accumulator is not None else SubspaceAccumulator()
    device = next(model.parameters()).device
    used = selected = 0
    rows = []
    agree = (majority_agrees(probe_items, ro.texts, s.probe_samples) if s.selector == "vote"
             else [True] * len(ro.texts))
    for it, p_ids, c_ids, text, ok in zip(probe_items, ro.prompt_ids, ro.completion_ids, ro.texts, agree):
        sel = select_tokens(tokenizer, it, c_ids, text, s.selector) if ok else []
        if sum(sel):
            rows.append((p_ids, c_ids, sel))
    if not rows:
        raise ConfigError(f"spd.selector={s.selector}: none of the {len(prompts)} probe completions had "
                          "correctness-defining tokens (the model never wrote an answer span the selector "
                          "knows); try --spd.selector all or a larger --spd.probe_size")
    for start in range(0, len(rows), micro_batch):
        chunk = rows[start:start + micro_batch]
        batch = make_batch([r[0] for r in chunk], [r[1] for r in chunk], tokenizer.pad_token_id).to(device)
        loss_mask = torch.zeros_like(batch.completion_mask_BT)
        for b, (p_ids, c_ids, sel) in enumerate(chunk):
            loss_mask[b, len(p_ids):len(p_ids) + len(c_ids)] = torch.tensor(sel, device=device)
        kv = kv_gradients(model, batch.input_ids_BT, batch.attention_mask_BT, loss_mask,
                          position_ids_BT=batch.position_ids_BT,
                          positions="all" if s.grad_positions == "all" else "completion", key_site=s.key_site)
        acc.add(kv)
        used += len(chunk)
        selected += int(loss_mask.sum())
    sset = acc.fit(rank=s.rank or None, energy=s.energy or None, per_head=s.per_head, center=s.center,
                   extra={"selector": s.selector, "probe_sequences": used, "selected_tokens": selected,
                          "seed": seed})
    log(f"spd subspace: {used}/{len(prompts)} probe completions with correctness tokens, "
        f"{selected} tokens, rank {s.rank or 'by energy'} on {len(sset.subspaces)} sites")
    if s.subspace == "random":
        sset = randomize(sset, seed)
    return sset


class _SubspaceOwner:
    """What SPD and its on-policy variant share: the round's capability subspace, checked, extracted and saved."""

    ctx: Any
    subspaces: SubspaceSet | None
    _early: tuple[SubspaceSet, Any] | None

    @classmethod
    def check(cls, cfg, tasks) -> None:
        """``spd.layers`` reads; ``spd.subspace_path`` is a subspace file."""
        _parse_layers(cfg.spd.layers)
        if cfg.spd.subspace_path:
            _load_subspace_file(cfg.spd.subspace_path)

    def precheck(self) -> None:
        """SPD can edit this model's K/V, ``spd.layers`` names its layers, and round 0's subspace is
        extracted now, before the first evaluation: a model whose probe completions hold no answer span
        stops the run before anything is written (step 0 then uses this subspace, with the RNG state the
        extraction left, so the run draws exactly what extracting at step 0 would)."""
        ctx, s = self.ctx, self.ctx.cfg.spd
        model = unwrap(ctx.model)
        try:
            sites = {site.key: site for site in kv_sites(model)}
        except ValueError as e:
            raise ConfigError(f"method {ctx.cfg.method}: model.path {ctx.cfg.model.path}: {e}") from None
        layers = sorted({layer for layer, _ in sites})
        spec = _parse_layers(s.layers)
        missing = [l for l in spec if l not in layers] if isinstance(spec, list) else []
        if missing or (isinstance(spec, int) and spec > len(layers)):
            raise ConfigError(f"spd.layers {s.layers}: model.path {ctx.cfg.model.path} has layers "
                              f"{layers[0]}..{layers[-1]}")
        if s.subspace_path:
            sset = _load_subspace_file(s.subspace_path)
            sites = {site.key: site for site in kv_sites(model, sset.key_site)}  # where that file's K sites were
            bad = next((k for k, sub in sset.subspaces.items() if k not in sites or sites[k].width != sub.dim), None)
            if bad is not None:
                raise ConfigError(f"spd.subspace_path {s.subspace_path}: its site {bad} does not match model.path "
                                  f"{ctx.cfg.model.path} (extracted from another model?)")
            return
        self._early = (self._extract(0), _torch_rng())

    def _extract(self, round_idx: int) -> SubspaceSet:
        """The round's subspace: extracted by process 0 and broadcast, so every process projects onto the
        very same one (an error there, e.g. no answer span, is raised on every process)."""
        ctx = self.ctx
        got: tuple[str, Any] = ("", None)
        if ctx.rank == 0:
            try:
                got = ("ok", extract_subspace(unwrap(ctx.model), ctx.tokenizer, ctx.stream.items, ctx.cfg,
                                              seed=ctx.cfg.seed * 1000 + round_idx, system=ctx.system, log=ctx.log))
            except ConfigError as e:
                if ctx.world == 1:
                    raise
                got = ("error", str(e))
        if ctx.world > 1:
            box = [got]
            torch.distributed.broadcast_object_list(box, src=0)
            got = box[0]
        if got[0] == "error":
            raise ConfigError(got[1])
        return got[1]

    def load_round_subspace(self, round_idx: int) -> None:
        """``self.subspaces`` for round ``round_idx``: loaded, or round 0's from precheck, or extracted; saved."""
        ctx, s = self.ctx, self.ctx.cfg.spd
        if s.subspace_path:
            self.subspaces = load_subspaces(s.subspace_path)
            return
        if round_idx == 0 and self._early is not None:
            self.subspaces, rng = self._early
            self._early = None
            _set_torch_rng(rng)
        else:
            self.subspaces = self._extract(round_idx)
        if ctx.accelerator.is_main_process:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            save_subspaces(ctx.out_dir / f"subspace-round{round_idx}.safetensors", self.subspaces)

    def projection(self, model, fold: bool) -> ContextManager[Any]:
        """The SPD view on ``model``: its K/V projected onto the subspace (``spd.beta``, layers, kinds)."""
        s = self.ctx.cfg.spd
        kinds = ("k", "v") if s.kinds == "kv" else (s.kinds,)
        return project_kv(model, self.subspaces, beta=s.beta, layers=_layer_spec(s.layers, self.subspaces),
                          kinds=kinds, fold=fold)


@register
class SPD(_SubspaceOwner, SelfGenMethod):
    name = "spd"
    sections = ("spd",)
    paper = "arXiv 2605.22675"
    summary = ("self-policy distillation: SFT on samples generated with K/V projected onto the model's "
               "own capability subspace")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.rounds = ctx.cfg.spd.rounds
        self.samples_per_prompt = ctx.cfg.spd.samples_per_prompt
        self.subspaces: SubspaceSet | None = None
        self._early: tuple[SubspaceSet, Any] | None = None  # round 0's subspace from precheck, and the RNG after it

    def on_round_start(self, round_idx: int) -> None:
        self.load_round_subspace(round_idx)

    def view(self) -> ContextManager[Any]:
        return self.projection(unwrap(self.ctx.model), fold=self.ctx.cfg.spd.fold)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["subspaces"] = self.subspaces
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.subspaces = state.get("subspaces")


@register
class SPDOnPolicy(_SubspaceOwner, OnPolicyMethod):
    """SPD's view as an on-policy teacher (ours; the paper distils by SFT only).

    The student samples with plain weights; the teacher is the same model (``teacher.kind``: initial by
    default) with its K/V projected onto the capability subspace, scoring the student's own tokens behind
    the same prompt; the loss is the objective library's divergence (``distill.*``). The subspace is
    extracted once, from the initial model, before the first step (``spd.rounds`` does not apply). The
    projection is applied by hooks, never folded: with a LoRA student the teacher module is the student's
    own base, whose weights a backward pass still needs unchanged.
    """

    name = "spd-opd"
    sections = ("spd", "onpolicy", "distill", "teacher")
    paper = "arXiv 2605.22675 (on-policy variant)"
    summary = ("on-policy SPD: the model with K/V projected onto its own capability subspace is the "
               "teacher of the plain model's rollouts")

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.subspaces: SubspaceSet | None = None
        self._early: tuple[SubspaceSet, Any] | None = None

    def setup(self) -> None:
        if self.subspaces is None:  # a resumed run restored it
            self.load_round_subspace(0)

    def teacher_prompts(self, groups) -> list[list[str | None]]:
        return [[g.item.prompt] * len(g.texts) for g in groups]

    def teacher_view(self, module) -> ContextManager[Any]:
        return self.projection(unwrap(module), fold=False)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "subspaces": self.subspaces}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.subspaces = state.get("subspaces")


def projected_policy_accuracy(model, tokenizer, tasks, cfg, sset: SubspaceSet, betas: list[float],
                              split: str = "valid") -> list[dict[str, Any]]:
    """Accuracy of the projected policy itself, per beta, on ``split`` (never a test split by default).

    SPD can only beat SSD if the policy that writes its training data is
    better than the plain one; this measures exactly that.
    """
    from dataclasses import replace

    from selfdistill.evaluate import evaluate

    ecfg = replace(cfg.eval, splits=[split], temperature=cfg.rollout.temperature or 1.0)
    rows = []
    s = cfg.spd
    kinds = ("k", "v") if s.kinds == "kv" else (s.kinds,)
    for beta in betas:
        with project_kv(model, sset, beta=beta, layers=_layer_spec(s.layers, sset), kinds=kinds, fold=s.fold):
            res = evaluate(model, tokenizer, tasks, ecfg, cfg.model.system_prompt or None)
        for r in res:
            rows.append({"beta": beta, "task": r.task, "split": r.split, "greedy": r.greedy, "sampled": r.sampled})
    return rows


def extract_subspace_cli(cfg, out: str, eval_betas: list[float] | None = None, diagnostics: bool = False) -> Path:
    """``selfdistill spd subspace``: extract, save (safetensors) and plot per-layer spectra; optionally the
    projected policy per beta and the diagnostics (:func:`write_diagnostics`)."""
    from selfdistill.models import load_model
    from selfdistill.tasks.registry import ItemStream, build_tasks

    tasks = build_tasks(cfg.data)
    model, tok = load_model(cfg.model)
    items = ItemStream(tasks, cfg.batch_size, cfg.seed).items
    acc = SubspaceAccumulator()
    sset = extract_subspace(model, tok, items, cfg, seed=cfg.seed * 1000, system=cfg.model.system_prompt or None,
                            accumulator=acc)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_subspaces(out_dir / "subspace.safetensors", sset)
    png = plot_spectra(sset, out_dir / "spectra.png")
    print(f"saved {out_dir / 'subspace.safetensors'} and {png}")
    for (layer, kind), e in sorted(layer_energy(sset).items()):
        s = sset.subspaces[(layer, kind)]
        print(f"layer {layer} {kind}: rank {s.rank}/{s.dim}, gradient energy {e:.3e}")
    if eval_betas:
        import json

        rows = projected_policy_accuracy(model, tok, tasks, cfg, sset, eval_betas)
        (out_dir / "projected_policy.json").write_text(json.dumps(rows, indent=2))
        print("projected-policy accuracy on the valid split (%):")
        print(f"{'beta':>5}  {'task':<10} {'greedy':>7} {'sampled':>8}")
        for r in rows:
            g = "-" if r["greedy"] is None else f"{100 * r['greedy']:.1f}"
            sm = "-" if r["sampled"] is None else f"{100 * r['sampled']:.1f}"
            print(f"{r['beta']:>5}  {r['task']:<10} {g:>7} {sm:>8}")
    if diagnostics:
        write_diagnostics(model, tok, tasks, items, cfg, sset, acc, eval_betas or [0.0, 0.5, 0.9, 1.0], out_dir)
    return out_dir


def write_diagnostics(model, tok, tasks, items, cfg, sset: SubspaceSet, acc: SubspaceAccumulator,
                      betas: list[float], out_dir: Path) -> Path:
    """Energy shares vs random, answer-vs-style principal angles, and the projected policy's shift per beta
    (on the ``valid`` split), printed, saved as ``diagnostics.json`` and plotted (``diagnostics.png``)."""
    import json
    from dataclasses import replace

    from selfdistill.methods.spd.diagnostics import energy_shares, principal_angles_deg, projection_shift

    shares = energy_shares(acc, sset)
    style_cfg = replace(cfg, spd=replace(cfg.spd, selector="style"))
    try:
        style = extract_subspace(model, tok, items, style_cfg, seed=cfg.seed * 1000, log=lambda s: None,
                                 system=cfg.model.system_prompt or None)
    except ConfigError:  # no style lines in the probe (not the toy world): no angles
        style = None
    sites = []
    for sh in shares:
        key = (sh.layer, sh.kind)
        angles = (principal_angles_deg(sset.subspaces[key].U_dr, style.subspaces[key].U_dr)
                  if style is not None and key in style.subspaces else [])
        sites.append({**sh.__dict__, "random_share": sh.random_share, "angles_answer_style_deg": angles})
        print(f"layer {sh.layer} {sh.kind}: gradient energy inside {100 * sh.grad_share:.1f}%, centred activation "
              f"energy inside {100 * sh.act_share:.1f}% (random subspace {100 * sh.random_share:.1f}%)"
              + (f", smallest answer/style angle {angles[0]:.1f} deg" if angles else ""))
    valid = [it for t in tasks for it in t.items("valid")[: cfg.eval.max_items or None]]
    shift = projection_shift(model, tok, valid, sset, betas, max_new_tokens=cfg.eval.max_new_tokens,
                             batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                             kinds=("k", "v") if cfg.spd.kinds == "kv" else (cfg.spd.kinds,),
                             system=cfg.model.system_prompt or None)
    for r in shift:
        print(f"beta {r['beta']}: accuracy {100 * r['accuracy']:.1f}%, KL(projected||plain) {r['kl_proj_plain']:.3f} "
              f"nats/token, spaced {100 * r['spaced']:.0f}%, preamble {100 * r['preamble']:.0f}%, closing "
              f"{100 * r['closing']:.0f}%, mean length {r['mean_len']:.1f}")
    path = out_dir / "diagnostics.json"
    path.write_text(json.dumps({"sites": sites, "betas": shift, "split": "valid", "items": len(valid)}, indent=2))
    _plot_diagnostics(sites, shift, out_dir / "diagnostics.png")
    print(f"saved {path} and {out_dir / 'diagnostics.png'}")
    return path


def _plot_diagnostics(sites: list[dict[str, Any]], shift: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(sites))
    a.bar([i - 0.25 for i in x], [s["grad_share"] for s in sites], 0.25, label="gradient energy")
    a.bar(list(x), [s["act_share"] for s in sites], 0.25, label="activation energy (centred)")
    a.bar([i + 0.25 for i in x], [s["random_share"] for s in sites], 0.25, label="random subspace")
    a.set(xticks=list(x), xticklabels=[f"L{s['layer']}{s['kind']}" for s in sites], ylim=(0, 1),
          title="share inside the subspace")
    a.legend(fontsize=7)
    betas = [r["beta"] for r in shift]
    b.plot(betas, [r["accuracy"] for r in shift], marker="o", label="accuracy (valid, T=1)")
    b.plot(betas, [r["kl_proj_plain"] for r in shift], marker="s", label="KL(projected || plain), nats/token")
    b.set(xlabel="beta (1 = no projection)", title="the projected policy")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_spectra(sset: SubspaceSet, path: Path) -> Path:
    """Per-layer singular-value spectra of the K and V gradients (normalised, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, kind in zip(axes, ("k", "v")):
        for (layer, k), s in sorted(sset.subspaces.items()):
            if k != kind:
                continue
            sv = s.singular_values_Hk.flatten().float()
            sv = sv / sv.max().clamp(min=1e-30)
            ax.plot(range(1, len(sv) + 1), sv.numpy(), marker=".", label=f"layer {layer}")
            ax.axvline(s.rank, color="grey", lw=0.5, ls=":")
        ax.set(title=f"{'keys' if kind == 'k' else 'values'}: gradient singular values", xlabel="index",
               yscale="log")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("sigma / sigma_1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
