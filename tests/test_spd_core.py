"""SPD core: architecture adapter, K/V gradients, subspace fitting, projection hooks.

Tiny random models built from configs (no downloads), one per supported layout:
separate projections with GQA (Llama, Qwen2, Qwen3 with k_norm, Mistral,
Gemma 2, Gemma 3), fused q|k|v with GQA (Phi-3), fused Conv1D (GPT-2), and
fused ``query_key_value``: per-head interleaved (GPT-NeoX, Bloom, Falcon
without multi-query), grouped with GQA (Falcon's new decoder architecture)
and q|k|v with one KV head (Falcon's default multi-query).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from selfdistill.arch import edit_kv, kv_sites, sites_by_key
from selfdistill.methods.spd.projection import project, project_kv, select_layers
from selfdistill.methods.spd.subspace import (Subspace, SubspaceAccumulator, SubspaceSet, fit_subspace,
                                      fit_subspace_from_gram, kv_gradients, layer_energy,
                                      load_subspaces, save_subspaces)

VOCAB = 100
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
_FUSED = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=8),
    "mistral": lambda: tf.MistralConfig(**_COMMON),
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=8),
    "gemma3": lambda: tf.Gemma3TextConfig(**_COMMON, head_dim=8),
    "olmo2": lambda: tf.Olmo2Config(**_COMMON),
    "phi3": lambda: tf.Phi3Config(**_COMMON),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "neox": lambda: tf.GPTNeoXConfig(**_FUSED),  # (heads, 3, head_dim), partial rotary after the split
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2),  # (heads, 3, head_dim), ALiBi
    "falcon": lambda: tf.FalconConfig(**_FUSED),  # the default: multi-query, q heads | k | v
    "falcon_new": lambda: tf.FalconConfig(**_FUSED, new_decoder_architecture=True, num_kv_heads=2, bias=True),
    "falcon_mha": lambda: tf.FalconConfig(**_FUSED, multi_query=False),  # (heads, 3, head_dim)
}
ARCHS = list(CONFIGS)
#: Fused query_key_value families: (groups, slots, k slot, v slot), the model's own view of the output as
#: (..., groups, slots, head_dim) and the slots holding the keys and values (written out from each model's code).
QKV_VIEW = {"neox": (4, 3, 1, 2), "bloom": (4, 3, 1, 2), "falcon_mha": (4, 3, 1, 2),
            "falcon_new": (2, 4, 2, 3),  # per KV head: its 2 queries, k, v
            "falcon": (1, 6, 4, 5)}  # 4 query heads, then the one k head and the one v head
FUSED = list(QKV_VIEW)


@functools.lru_cache(maxsize=None)
def tiny(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation="eager")
    return model.to(dtype).eval()


def batch(seed: int = 1, B: int = 2, T: int = 10, left_pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, row 0 left-padded by ``left_pad`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids_BT = torch.randint(3, VOCAB, (B, T), generator=g)
    mask_BT = torch.ones(B, T, dtype=torch.long)
    mask_BT[0, :left_pad] = 0
    ids_BT[0, :left_pad] = 0
    return ids_BT, mask_BT


def positions_of(mask_BT: torch.Tensor) -> torch.Tensor:
    return (mask_BT.cumsum(-1) - 1).clamp(min=0)


def logits(model: nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_of(mask_BT),
                     use_cache=False).logits


def random_subspaces(model: nn.Module, rank: int | None, seed: int = 0, with_mu: bool = True,
                     dtype: torch.dtype = torch.float32) -> dict:
    """Random orthonormal bases (rank None = full), for testing the hooks alone."""
    g = torch.Generator().manual_seed(seed)
    subs = {}
    for site in kv_sites(model):
        d = site.width
        r = d if rank is None else rank
        U_dr = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:, :r]
        mu_d = 0.3 * torch.randn(d, generator=g) if with_mu else None
        subs[site.key] = Subspace(U_dr.to(dtype), mu_d, torch.ones(1, d), (r,), grad_energy=float(site.layer))
    return subs


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# --------------------------------------------------------------------------- arch


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_sites_cover_every_layer_with_kv_width(arch):
    model = tiny(arch)
    sites = kv_sites(model)
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    assert [s.key for s in sites] == [(l, k) for l in range(n_layers) for k in ("k", "v")]
    kv_heads = {"gpt2": 4, "neox": 4, "bloom": 4, "falcon_mha": 4, "falcon": 1}.get(arch, 2)  # else GQA
    for s in sites:
        assert (s.num_heads, s.head_dim, s.width) == (kv_heads, 8, kv_heads * 8)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmo2"])
def test_key_sites_sit_after_the_key_norm_where_the_gradient_is_not_orthogonal_to_the_key(arch):
    """Before a key norm the loss is invariant to rescaling a key, so grad . key = 0 exactly there;
    at the norm's output (the K site) it is not."""
    model = tiny(arch)
    ids_BT, mask_BT = batch(seed=5, left_pad=0)
    loss_mask_BT = torch.zeros_like(mask_BT)
    loss_mask_BT[:, 5:] = 1

    def mean_abs_cos(key_site: str) -> float:
        kv = kv_gradients(model, ids_BT, mask_BT, loss_mask_BT, key_site=key_site)
        cos = []
        for (layer, kind), g_Nd in kv.grads.items():
            if kind != "k":
                continue
            a_Nd = kv.acts[(layer, kind)]
            H = kv.num_heads[(layer, kind)]
            if arch != "olmo2":  # per-head norm: per head; OLMo 2 normalises the whole key vector
                g_Nd, a_Nd = g_Nd.reshape(-1, g_Nd.shape[1] // H), a_Nd.reshape(-1, a_Nd.shape[1] // H)
            keep = g_Nd.norm(dim=1) > 1e-8
            cos.append(torch.nn.functional.cosine_similarity(g_Nd[keep], a_Nd[keep], dim=1).abs().mean())
        return float(torch.stack(cos).mean())

    sites = {s.key: s for s in kv_sites(model)}
    assert sites[(0, "k")].module_name.endswith("k_norm") and sites[(0, "v")].module_name.endswith("v_proj")
    assert kv_sites(model, key_site="proj")[0].module_name.endswith("k_proj")
    assert mean_abs_cos("proj") < 1e-3
    assert mean_abs_cos("auto") > 0.02


def test_kv_sites_error_names_model_class():
    with pytest.raises(ValueError, match="Sequential"):
        kv_sites(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "neox", "falcon_new"])
def test_edit_kv_reaches_the_right_columns(arch):
    """Editing a site replaces exactly its columns of the projection's output (a slice, or interleaved)."""
    model = tiny(arch)
    site = kv_sites(model)[1]  # layer 0, 'v'
    x_BTD = torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        raw = site.module(x_BTD)
        with edit_kv(model, {site.key: lambda h: torch.full_like(h, 7.0)}):
            out = site.module(x_BTD)
    mine = torch.zeros(raw.shape[-1], dtype=torch.bool)
    mine[site.rows()] = True
    assert int(mine.sum()) == site.width and torch.all(out[..., mine] == 7.0)
    torch.testing.assert_close(out[..., ~mine], raw[..., ~mine], atol=0, rtol=0)
    torch.testing.assert_close(site.read(out), torch.full((1, 3, site.width), 7.0), atol=0, rtol=0)


def _own_kv(model: nn.Module, layer: int, fused_BTW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values split from layer ``layer``'s ``query_key_value`` output by the model's own code,
    ``(B, T, heads, head_dim)`` with the heads attention sees (Falcon's new decoder: each KV head repeated)."""
    if isinstance(model, tf.GPTNeoXForCausalLM):  # inline in GPTNeoXAttention.forward
        hd = model.config.hidden_size // model.config.num_attention_heads
        _, k, v = fused_BTW.view(*fused_BTW.shape[:-1], -1, 3 * hd).transpose(1, 2).chunk(3, dim=-1)
        return k.transpose(1, 2), v.transpose(1, 2)
    attn = model.transformer.h[layer].self_attention
    if isinstance(model, tf.BloomForCausalLM):
        _, k, v = attn._reshape(fused_BTW)
        return k.transpose(1, 2), v.transpose(1, 2)
    _, k, v = attn._split_heads(fused_BTW)
    return k, v


def _rotated(model: nn.Module, k_BHTd: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
    """Keys after the model's own rotary embedding (unchanged under Bloom's ALiBi)."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        return k_BHTd
    cos, sin = rotary(k_BHTd, position_ids_BT)
    return sys.modules[type(model).__module__].apply_rotary_pos_emb(k_BHTd, k_BHTd, cos, sin)[1]


@pytest.mark.parametrize("arch", FUSED)
def test_fused_qkv_sites_read_the_keys_and_values_attention_uses(arch):
    """A query_key_value site reads what the model's own split gives attention, and what its cache holds:
    values as they are, keys once the model's rotary embedding has turned them."""
    model = tiny(arch)
    ids_BT, mask_BT = batch(left_pad=0)
    by_key = sites_by_key(model)
    fused: dict[str, torch.Tensor] = {}
    handles = [s.module.register_forward_hook(lambda _m, _a, out, n=s.module_name: fused.__setitem__(n, out))
               for s in by_key.values()]
    try:
        with torch.no_grad():
            cache = model(input_ids=ids_BT, attention_mask=mask_BT, use_cache=True).past_key_values
    finally:
        for h in handles:
            h.remove()
    for layer in range(2):
        k_site, v_site = by_key[(layer, "k")], by_key[(layer, "v")]
        assert k_site.module_name.endswith("query_key_value") and k_site.module is v_site.module
        out_BTW = fused[k_site.module_name]
        k_own, v_own = _own_kv(model, layer, out_BTW)
        rep = k_own.shape[2] // k_site.num_heads  # Falcon's new decoder: queries per KV head
        k_BTHd, v_BTHd = (s.read(out_BTW).unflatten(-1, (s.num_heads, s.head_dim)).repeat_interleave(rep, dim=2)
                          for s in (k_site, v_site))
        assert torch.equal(k_BTHd, k_own) and torch.equal(v_BTHd, v_own)
        kv_heads = cache.layers[layer].values.shape[1]  # Falcon's multi-query caches its one KV head
        k_BHTd, v_BHTd = (x[:, :, :kv_heads].transpose(1, 2) for x in (k_BTHd, v_BTHd))
        torch.testing.assert_close(cache.layers[layer].values, v_BHTd, atol=0, rtol=0)
        torch.testing.assert_close(cache.layers[layer].keys, _rotated(model, k_BHTd, positions_of(mask_BT)),
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", FUSED)
def test_fused_qkv_edits_equal_the_same_edit_done_by_hand(arch):
    """Scaling (plus an offset: a per-column scale alone acts on q.k as on the queries) or zeroing sites
    through edit_kv gives exactly the logits of the same edit written against the model's own view of
    query_key_value; identity edits change nothing."""
    model = tiny(arch)
    ids_BT, mask_BT = batch()
    base = logits(model, ids_BT, mask_BT)
    groups, slots, k_slot, v_slot = QKV_VIEW[arch]
    g = torch.Generator().manual_seed(0)
    # K and V of one module scaled and shifted, V of another zeroed: (scale, offset), each (groups, head_dim)
    edit = {(0, "k"): (torch.rand(groups, 8, generator=g) + 0.5, torch.randn(groups, 8, generator=g)),
            (0, "v"): (torch.rand(groups, 8, generator=g) + 0.5, torch.randn(groups, 8, generator=g)),
            (1, "v"): (torch.zeros(groups, 8), torch.zeros(groups, 8))}
    by_key = sites_by_key(model)

    def by_hand(layer: int):
        def hook(_m, _a, out):
            new = out.clone()
            view = new.view(*new.shape[:-1], groups, slots, 8)
            for kind, slot in (("k", k_slot), ("v", v_slot)):
                if (layer, kind) in edit:
                    scale, offset = edit[(layer, kind)]
                    view[..., slot, :] = view[..., slot, :] * scale + offset
            return new
        return hook

    handles = [by_key[(layer, "k")].module.register_forward_hook(by_hand(layer)) for layer in (0, 1)]
    try:
        want = logits(model, ids_BT, mask_BT)
    finally:
        for h in handles:
            h.remove()
    with edit_kv(model, {key: (lambda h, s=s, c=c: h * s.flatten() + c.flatten()) for key, (s, c) in edit.items()}):
        got = logits(model, ids_BT, mask_BT)
    assert torch.equal(got, want) and (got - base).abs().max() > 1e-3
    with edit_kv(model, {key: (lambda h: h) for key in by_key}):
        assert torch.equal(logits(model, ids_BT, mask_BT), base)
    with edit_kv(model, {key: (lambda h: h.clone()) for key in [(0, "k"), (1, "v")]}):
        assert torch.equal(logits(model, ids_BT, mask_BT), base)
    assert hook_count(model) == 0


def test_unknown_query_key_value_layout_raises_a_clear_error():
    """A query_key_value whose family is not known is refused, not split by guess."""
    class OtherAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_key_value = nn.Linear(8, 24)
            self.num_heads, self.head_dim = 2, 4

    with pytest.raises(ValueError, match="OtherAttention: its q/k/v layout is not known"):
        kv_sites(nn.ModuleList([OtherAttention()]))


# --------------------------------------------------------------------------- projection


def test_project_matches_dense_formula_and_per_head_blocks():
    g = torch.Generator().manual_seed(0)
    d, H = 16, 2
    h_Xd = torch.randn(3, 5, d, generator=g, dtype=torch.float64)
    mu_d = torch.randn(d, generator=g, dtype=torch.float64)
    grads_Nd = torch.randn(50, d, generator=g, dtype=torch.float64)
    sub = fit_subspace(grads_Nd, rank=3, per_head=H)
    U_dr = sub.U_dr.double()
    assert U_dr.shape == (d, 6) and sub.head_ranks == (3, 3)
    assert torch.all(U_dr[: d // 2, 3:] == 0) and torch.all(U_dr[d // 2:, :3] == 0)  # block-diagonal
    P_dd = U_dr @ U_dr.T
    for beta in (0.0, 0.25, 1.0):
        want = mu_d + (h_Xd - mu_d) @ (P_dd + beta * (torch.eye(d, dtype=torch.float64) - P_dd)).T
        torch.testing.assert_close(project(h_Xd, U_dr, beta, mu_d), want)


@pytest.mark.parametrize("arch", ARCHS)
def test_projection_hooks_are_exact(arch):
    model = tiny(arch)
    ids_BT, mask_BT = batch()
    base = logits(model, ids_BT, mask_BT)
    low = random_subspaces(model, rank=2)
    full = random_subspaces(model, rank=None)

    with project_kv(model, low, beta=1.0):  # identity, hooks active
        assert hook_count(model) > 0
        assert torch.equal(logits(model, ids_BT, mask_BT), base)
    for beta in (0.0, 0.6):  # full rank: P = I whatever beta
        with project_kv(model, full, beta=beta):
            torch.testing.assert_close(logits(model, ids_BT, mask_BT), base, atol=1e-4, rtol=1e-4)
    with project_kv(model, low, beta=0.0):  # low rank really acts
        once = logits(model, ids_BT, mask_BT)
        with project_kv(model, low, beta=0.0):  # and projecting twice == once
            twice = logits(model, ids_BT, mask_BT)
    assert (once - base).abs().max() > 1e-2
    torch.testing.assert_close(twice, once, atol=1e-5, rtol=1e-5)
    with project_kv(model, low, beta=0.0, kinds=("k",)):  # K alone and V alone both act
        only_k = logits(model, ids_BT, mask_BT)
    with project_kv(model, low, beta=0.0, kinds=("v",)):
        only_v = logits(model, ids_BT, mask_BT)
    assert (only_k - base).abs().max() > 1e-3 and (only_v - base).abs().max() > 1e-3
    assert hook_count(model) == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_under_projection_equals_no_cache_forward(arch):
    """The KV cache holds projected values: cached greedy decoding == full projected forward."""
    model = tiny(arch)
    ids_BT, mask_BT = batch(seed=2, T=6, left_pad=2)
    subs = random_subspaces(model, rank=3, seed=1)
    new = 4
    with project_kv(model, subs, beta=0.2):
        with torch.no_grad():
            out = model.generate(input_ids=ids_BT, attention_mask=mask_BT, do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
        seq_BS = out.sequences
        full_mask_BS = torch.cat([mask_BT, torch.ones(2, new, dtype=torch.long)], 1)
        full_BSV = logits(model, seq_BS, full_mask_BS)
    T = ids_BT.shape[1]
    step_BNV = torch.stack(out.logits, 1)
    torch.testing.assert_close(step_BNV, full_BSV[:, T - 1:T - 1 + new], atol=1e-4, rtol=1e-4)
    plain_BSV = logits(model, seq_BS, full_mask_BS)  # the projection mattered for these logits
    assert (plain_BSV[:, T - 1:T - 1 + new] - step_BNV).abs().max() > 1e-2


def test_hooks_removed_after_exception():
    model = tiny("phi3")
    subs = random_subspaces(model, rank=2)
    ids_BT, mask_BT = batch()
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with project_kv(model, subs, beta=0.0):
            logits(model, ids_BT, mask_BT)
            raise RuntimeError("boom")
    assert hook_count(model) == before

    def bad_edit(h):
        raise RuntimeError("edit failed")

    with pytest.raises(RuntimeError, match="edit failed"):
        with edit_kv(model, {(1, "v"): bad_edit}):
            logits(model, ids_BT, mask_BT)
    assert hook_count(model) == before
    with pytest.raises(ValueError, match="beta"):
        with project_kv(model, subs, beta=1.5):
            pass
    assert hook_count(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_folded_projection_equals_hooks_and_restores_weights(arch):
    """fold=True: the map lives in the K/V weights (no hooks where the module is a plain Linear), the logits
    equal the hooked ones, and every parameter (and a missing bias) is back bit for bit after the block."""
    model = tiny(arch)
    ids_BT, mask_BT = batch()
    subs = random_subspaces(model, rank=2, seed=3)  # centred: a bias-free projection gains a bias in the block
    state = {k: v.clone() for k, v in model.state_dict().items()}
    no_bias = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None}
    with project_kv(model, subs, beta=0.3):
        hooked = logits(model, ids_BT, mask_BT)
    with project_kv(model, subs, beta=0.3, fold=True):
        folded = logits(model, ids_BT, mask_BT)
        # GPT-2's Conv1D keeps its hooks; a K site after a key norm is not a linear map's output: hooked;
        # query_key_value sites (interleaved or not, nn.Linear or FalconLinear) fold into their weight rows
        hooks = {"gpt2": 2, "qwen3": 2, "gemma3": 2, "olmo2": 2}.get(arch, 0)
        assert hook_count(model) == hooks
    torch.testing.assert_close(folded, hooked, atol=2e-5, rtol=2e-5)
    assert (hooked - logits(model, ids_BT, mask_BT)).abs().max() > 1e-3
    assert {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is None} == no_bias
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_folded_weights_restored_after_exception_and_seen_by_vllm_guard():
    from selfdistill import vllm_backend

    model = tiny("qwen3")
    subs = random_subspaces(model, rank=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    vllm_backend.set_engine_factory(lambda m, c: None)
    try:
        assert vllm_backend.usable(model)
        with pytest.raises(RuntimeError, match="boom"):
            with project_kv(model, subs, beta=0.0, fold=True):
                assert not vllm_backend.usable(model)  # vLLM would sample from the unfolded weights
                with project_kv(model, subs, beta=0.5, fold=True):  # nested folds
                    pass
                assert not vllm_backend.usable(model)  # the outer fold is still active
                raise RuntimeError("boom")
        assert vllm_backend.usable(model)
    finally:
        vllm_backend.set_engine_factory(None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.model.layers[0].self_attn.k_proj.bias is None


def test_fold_falls_back_to_hooks_where_writing_the_weight_would_not_act():
    """A pre-hook on the projection (weight norm, offloading) or a meta weight: hooks, not a silent no-op fold."""
    model = tiny("llama")
    subs = random_subspaces(model, rank=2)
    k0 = model.model.layers[0].self_attn.k_proj
    w0 = k0.weight.clone()
    handle = k0.register_forward_pre_hook(lambda m, a: None)
    try:
        with project_kv(model, subs, beta=0.0, fold=True):
            assert hook_count(model) == 1 and torch.equal(k0.weight, w0)  # k_proj hooked, left as it was
    finally:
        handle.remove()
    bad = {k: dataclasses.replace(v, U_dr=v.U_dr[:4], mu_d=v.mu_d[:4]) for k, v in subs.items()}
    with pytest.raises(ValueError, match="width"):
        with project_kv(model, bad, beta=0.0, fold=True):
            pass


def test_layer_selection():
    subs = random_subspaces(tiny("llama"), rank=2)  # grad_energy = layer index
    assert select_layers(subs, "all") == [0, 1]
    assert select_layers(subs, ("top", 1)) == [1]
    assert select_layers(subs, [0]) == [0]
    with pytest.raises(KeyError, match="layer 5"):
        select_layers(subs, [5])


# --------------------------------------------------------------------------- gradients


def brute_force_grad(model, site, ids_BT, mask_BT, loss_mask_BT) -> torch.Tensor:
    """d loss / d activation via an additive zero perturbation and .backward(), loss written out by hand."""
    B, T = ids_BT.shape
    delta_BTd = torch.zeros(B, T, site.width, requires_grad=True)
    with edit_kv(model, {site.key: lambda h: h + delta_BTd}):
        logp_BTV = torch.log_softmax(model(input_ids=ids_BT, attention_mask=mask_BT,
                                           position_ids=positions_of(mask_BT)).logits.double(), -1)
    nll = 0.0
    for b in range(B):
        for t in range(1, T):
            if loss_mask_BT[b, t] and mask_BT[b, t]:
                nll = nll - logp_BTV[b, t - 1, ids_BT[b, t]]
    nll.backward()
    return delta_BTd.grad


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_gradients_match_brute_force(arch):
    model = tiny(arch)  # float32: float64 eager attention turns left padding into NaN in transformers
    ids_BT, mask_BT = batch(seed=3)
    loss_mask_BT = torch.zeros_like(mask_BT)
    loss_mask_BT[:, 6:] = 1  # the "completion"
    model.train()
    kv = kv_gradients(model, ids_BT, mask_BT, loss_mask_BT)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    select_BT = mask_BT.bool()
    for site in kv_sites(model):
        want = brute_force_grad(model, site, ids_BT, mask_BT, loss_mask_BT)[select_BT].float()
        torch.testing.assert_close(kv.grads[site.key], want, atol=1e-5, rtol=1e-4)
    model.zero_grad(set_to_none=True)
    assert kv.grads[(0, "k")].shape == (int(mask_BT.sum()), kv_sites(model)[0].width)
    assert kv.num_targets == 2 * 4 and kv.grads[(1, "v")].abs().sum() > 0

    comp = kv_gradients(model, ids_BT, mask_BT, loss_mask_BT, positions="completion")
    torch.testing.assert_close(comp.grads[(0, "v")], kv.grads[(0, "v")][loss_mask_BT[select_BT].bool()])


def test_kv_gradients_finite_difference():
    # GPT-2 is float64 end to end (RMSNorm models upcast/downcast through float32); its K site is a
    # slice of the fused c_attn output
    model = tiny("gpt2", torch.float64)
    ids_BT, mask_BT = batch(seed=4, B=1, left_pad=0)
    loss_mask_BT = torch.zeros_like(mask_BT)
    loss_mask_BT[:, 7:] = 1
    site = kv_sites(model)[0]  # layer 0 keys
    kv = kv_gradients(model, ids_BT, mask_BT, loss_mask_BT, sites=[site.key])

    def loss_with(t: int, j: int, eps: float) -> float:
        def bump(h):
            h = h.clone()
            h[0, t, j] += eps
            return h
        with edit_kv(model, {site.key: bump}), torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids_BT).logits, -1)
        return float(-sum(logp[0, t_ - 1, ids_BT[0, t_]] for t_ in range(7, ids_BT.shape[1])))

    eps = 1e-6
    for t, j in [(2, 0), (5, 11), (6, 30)]:
        fd = (loss_with(t, j, eps) - loss_with(t, j, -eps)) / (2 * eps)
        assert abs(fd - float(kv.grads[site.key][t, j])) < 1e-5 * max(1.0, abs(fd))


def test_kv_gradients_with_frozen_weights_and_no_targets():
    model = tiny("gpt2")
    ids_BT, mask_BT = batch()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        kv = kv_gradients(model, ids_BT, mask_BT, mask_BT)
        assert kv.grads[(1, "v")].abs().sum() > 0
        with pytest.raises(ValueError, match="no target"):
            kv_gradients(model, ids_BT, mask_BT, torch.zeros_like(mask_BT))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


class _VocabWide(TorchDispatchMode):
    """Records the largest output (in elements) of any op whose last dimension is the vocabulary."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.peak = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.peak = max(self.peak, t.numel())
        return out


def full_logits_kv_grads(model, ids_BT, mask_BT, loss_mask_BT) -> dict:
    """kv_gradients as it was: full B x T x V logits from ``model(...)``, then cross-entropy on the targets."""
    outs: dict = {}
    sites = kv_sites(model)

    def capture(module, _args, out):
        outs[id(module)] = out
        return out

    handles = [s.module.register_forward_hook(capture) for s in sites]
    try:
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=positions_of(mask_BT),
                           use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    target_BT1 = loss_mask_BT[:, 1:].bool() & mask_BT[:, 1:].bool()
    loss = F.cross_entropy(logits_BTV[:, :-1][target_BT1].float(), ids_BT[:, 1:][target_BT1], reduction="sum")
    grads = torch.autograd.grad(loss, [outs[id(s.module)] for s in sites])
    return {s.key: g[..., s.start:s.stop][mask_BT.bool()].float() for s, g in zip(sites, grads)}


def _phi_with_head_bias() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, pad_token_id=0)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        model.lm_head.bias.normal_()  # Phi's head has a bias; make it matter
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi"])
def test_kv_gradients_never_hold_batch_length_vocab(arch):
    """Same gradients as the full-logits computation, yet no op output is ever B x T x V wide.

    Every head (llama, tied gpt2, phi with its bias, Gemma 2's soft-cap) takes
    the chunked path and never calls the LM head module.
    """
    model = _phi_with_head_bias() if arch == "phi" else tiny(arch)
    B, T, chunk = 4, 12, 8
    ids_BT, mask_BT = batch(seed=5, B=B, T=T)
    loss_mask_BT = torch.zeros_like(mask_BT)
    loss_mask_BT[:, 4:] = 1  # 32 targets: four chunks of 8 rows
    rows: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:-1].numel()))
    try:
        wide = _VocabWide(VOCAB)
        with wide:
            kv = kv_gradients(model, ids_BT, mask_BT, loss_mask_BT, chunk_size=chunk)
    finally:
        hook.remove()
    want = full_logits_kv_grads(model, ids_BT, mask_BT, loss_mask_BT)
    for key, grad in want.items():
        torch.testing.assert_close(kv.grads[key], grad, atol=1e-5, rtol=1e-4)
    hidden = model.config.hidden_size
    assert B * (T - 1) > max(chunk, hidden)  # so that a B x T x V tensor would stand out
    assert wide.peak <= max(chunk, hidden) * VOCAB  # chunk x V logits; the head's (H, V) transpose
    assert rows == []
    full = _VocabWide(VOCAB)
    with full:
        full_logits_kv_grads(model, ids_BT, mask_BT, loss_mask_BT)
    assert full.peak >= B * T * VOCAB  # the probe does see full logits


# --------------------------------------------------------------------------- subspaces


def test_energy_threshold_picks_rank_of_known_spectrum():
    g = torch.Generator().manual_seed(0)
    N, d = 200, 12
    A_Nd = torch.linalg.qr(torch.randn(N, d, generator=g, dtype=torch.float64))[0]
    Q_dd = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    energy_d = torch.tensor([50, 30, 10, 5, 3, 2, 0, 0, 0, 0, 0, 0], dtype=torch.float64)  # sums to 100
    grads_Nd = A_Nd @ torch.diag(energy_d.sqrt()) @ Q_dd.T
    for target, rank in [(0.5, 1), (0.8, 2), (0.85, 3), (0.9, 3), (0.95, 4), (1.0, 6)]:
        assert fit_subspace(grads_Nd, energy=target).rank == rank, target
    assert fit_subspace(grads_Nd, energy=0.99, rank=2).rank == 2  # rank caps energy
    sub = fit_subspace(grads_Nd, energy=0.85)
    torch.testing.assert_close(sub.singular_values_Hk[0].double(), energy_d.sqrt(), atol=1e-5, rtol=1e-5)
    U_dr = sub.U_dr.double()
    torch.testing.assert_close(U_dr.T @ U_dr, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(U_dr @ U_dr.T, Q_dd[:, :3] @ Q_dd[:, :3].T, atol=1e-6, rtol=0)
    idx_r = U_dr.abs().argmax(0)
    assert torch.all(U_dr[idx_r, torch.arange(3)] > 0)  # sign convention
    with pytest.raises(ValueError, match="rank or energy"):
        fit_subspace(grads_Nd)
    with pytest.raises(ValueError, match="rank must be"):
        fit_subspace(grads_Nd, rank=13)


def fit_model(seed: int, per_head: bool = False) -> SubspaceSet:
    """Whole pipeline on two batches: gradients -> accumulator -> subspaces."""
    model = tiny("qwen2")
    acc = SubspaceAccumulator()
    for s in (seed, seed + 1):
        ids_BT, mask_BT = batch(seed=s)
        acc.add(kv_gradients(model, ids_BT, mask_BT, mask_BT))
    return acc.fit(rank=3, per_head=per_head, center=True, extra={"seed": seed})


def test_subspace_extraction_deterministic_orthonormal_and_accumulates():
    a, b = fit_model(7), fit_model(7)
    for key, sub in a.subspaces.items():
        assert torch.equal(sub.U_dr, b.subspaces[key].U_dr)
        assert torch.equal(sub.mu_d, b.subspaces[key].mu_d)
        torch.testing.assert_close(sub.U_dr.T @ sub.U_dr, torch.eye(3), atol=1e-5, rtol=0)
    # accumulating two batches == fitting the stacked gradients at once
    model = tiny("qwen2")
    kvs = [kv_gradients(model, *batch(seed=s), batch(seed=s)[1]) for s in (7, 8)]
    stacked = fit_subspace(torch.cat([kv.grads[(1, "k")] for kv in kvs]), rank=3,
                           mean_d=torch.cat([kv.acts[(1, "k")] for kv in kvs]).mean(0))
    torch.testing.assert_close(stacked.U_dr, a.subspaces[(1, "k")].U_dr, atol=1e-5, rtol=0)
    torch.testing.assert_close(stacked.mu_d, a.subspaces[(1, "k")].mu_d)
    energy = layer_energy(a)
    assert set(energy) == set(a.subspaces) and all(e > 0 for e in energy.values())

    per_head = fit_model(7, per_head=True).subspaces[(0, "v")]
    assert per_head.head_ranks == (3, 3) and per_head.singular_values_Hk.shape == (2, 8)
    torch.testing.assert_close(per_head.U_dr.T @ per_head.U_dr, torch.eye(6), atol=1e-5, rtol=0)


def test_save_load_roundtrip(tmp_path):
    sset = fit_model(3, per_head=True)
    path = tmp_path / "subspaces.safetensors"
    save_subspaces(path, sset)
    back = load_subspaces(path)
    assert (back.rank, back.energy, back.per_head, back.center, back.model_class, back.extra) == (
        3, None, True, True, "Qwen2ForCausalLM", {"seed": 3})
    assert back.subspaces.keys() == sset.subspaces.keys()
    for key, sub in sset.subspaces.items():
        got = back.subspaces[key]
        assert torch.equal(got.U_dr, sub.U_dr) and torch.equal(got.mu_d, sub.mu_d)
        assert torch.equal(got.singular_values_Hk, sub.singular_values_Hk)
        assert (got.head_ranks, got.grad_energy, got.num_positions) == (
            sub.head_ranks, sub.grad_energy, sub.num_positions)
    no_mu = SubspaceSet({(0, "k"): fit_subspace_from_gram(torch.eye(4), rank=1)}, rank=1)
    save_subspaces(tmp_path / "b.safetensors", no_mu)
    assert load_subspaces(tmp_path / "b.safetensors").subspaces[(0, "k")].mu_d is None
