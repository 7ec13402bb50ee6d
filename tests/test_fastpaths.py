"""The speed paths are exact: lean decode loop, shared-prefix forward, folded SPD projection.

Each fast path is checked against the plain implementation it replaces
(transformers ``generate`` / the masked full forward / :func:`project`), in
float64 where the comparison is about the math rather than rounding.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

from selfdistill import fastgen
from selfdistill.arch import kv_sites
from selfdistill.rollout import SamplingConfig, generate
from selfdistill.sequences import forward_hidden, make_batch
from selfdistill.methods.spd.projection import DENSE_MAX_DIM, project, project_kv, projector
from selfdistill.methods.spd.subspace import Subspace

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               max_position_embeddings=128)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    "qwen3": lambda: tf.Qwen3Config(**_COMMON, head_dim=8),
    "mistral": lambda: tf.MistralConfig(**_COMMON, sliding_window=None),
}


@functools.lru_cache(maxsize=None)
def tiny(arch: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(CONFIGS[arch]()).to(dtype).eval()


def prompts(seed: int = 0, n: int = 3, dup: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    base = [torch.randint(3, VOCAB, (int(torch.randint(3, 9, (), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    return [p for p in base for _ in range(dup)]


def hf_greedy(model, ps: list[list[int]], new: int, eos: int | None = None):
    T = max(map(len, ps))
    ids = torch.zeros(len(ps), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(ps):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             pad_token_id=0, eos_token_id=eos if eos is not None else [], min_new_tokens=0)
    rows = out[:, T:].tolist()
    if eos is None:
        return rows
    cut = []
    for r in rows:
        k = next((i for i, t in enumerate(r) if t == eos), None)
        cut.append(r[: k + 1] if k is not None else r)
    return cut


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_lean_loop_greedy_equals_generate(arch):
    model = tiny(arch, torch.float64)
    assert fastgen.unsupported_reason(model) is None
    ps = prompts()
    got, finished = fastgen.sample(model, ps, 12, eos_ids=[], temperature=0)
    assert got == hf_greedy(model, ps, 12)
    assert finished == [False] * len(ps)


def test_lean_loop_stops_rows_at_eos_and_compacts():
    model = tiny("qwen3", torch.float64)
    ps = prompts(seed=3, n=4, dup=3)
    want = hf_greedy(model, ps, 16)
    # Pick as "EOS" a token some rows emit early, so rows end at different steps and the batch shrinks.
    eos = want[0][2]
    got, finished = fastgen.sample(model, ps, 16, eos_ids=[eos], temperature=0, compact_frac=0.01)
    cut = [r[: r.index(eos) + 1] if eos in r else r for r in want]
    assert got == cut
    assert finished == [eos in r for r in want]
    assert any(len(r) < 16 for r in got) and any(f for f in finished)


def test_lean_loop_sampling_rule():
    model = tiny("llama")
    ps = prompts(seed=1)
    greedy, _ = fastgen.sample(model, ps, 8, eos_ids=[], temperature=0)
    torch.manual_seed(0)
    top1, _ = fastgen.sample(model, ps, 8, eos_ids=[], temperature=1.0, top_k=1)
    assert top1 == greedy  # top-k 1 is greedy
    torch.manual_seed(0)
    a, _ = fastgen.sample(model, ps, 8, eos_ids=[], temperature=1.3, top_p=0.9, top_k=10)
    torch.manual_seed(0)
    b, _ = fastgen.sample(model, ps, 8, eos_ids=[], temperature=1.3, top_p=0.9, top_k=10)
    assert a == b  # reproducible from the global seed
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    for _ in range(20):  # top-p 0.5 keeps only the top token here (p = 0.64)
        assert fastgen._pick(logits, 1.0, 0, 0.5).item() == 3
        assert fastgen._pick(logits, 1.0, 2, 1.0).item() in (2, 3)


def test_lean_loop_runs_spd_hooks_like_generate():
    model = tiny("qwen3", torch.float64)
    g = torch.Generator().manual_seed(0)
    subs = {}
    for site in kv_sites(model):
        U = torch.linalg.qr(torch.randn(site.width, 3, generator=g, dtype=torch.float64))[0]
        subs[site.key] = Subspace(U, 0.3 * torch.randn(site.width, generator=g, dtype=torch.float64),
                                  torch.ones(1, 3), (3,))
    ps = prompts(seed=2)
    with project_kv(model, subs, beta=0.2):
        assert fastgen.unsupported_reason(model) is None  # K/V hooks sit on modules the loop calls
        got, _ = fastgen.sample(model, ps, 10, eos_ids=[], temperature=0)
        want = hf_greedy(model, ps, 10)
    assert got == want
    assert got != fastgen.sample(model, ps, 10, eos_ids=[], temperature=0)[0]  # the projection mattered


def test_unsupported_models_and_hooks_fall_back_to_generate():
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    assert "gpt2" in fastgen.unsupported_reason(gpt2)
    model = tiny("qwen3")
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: None)
    try:
        assert "hooks" in fastgen.unsupported_reason(model)
    finally:
        h.remove()
    assert fastgen.unsupported_reason(model) is None


def test_rollout_generate_fast_and_plain_agree_greedy(tiny_model_dir):
    from selfdistill.models import load_tokenizer

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": f"{i}+{i}="}], tokenize=False,
                                     add_generation_prompt=True) for i in range(3)] * 2
    fast = generate(model, tok, texts, SamplingConfig(max_new_tokens=10, temperature=0))
    plain = generate(model, tok, texts, SamplingConfig(max_new_tokens=10, temperature=0, fast_decode=False))
    assert fast.completion_ids == plain.completion_ids
    assert fast.finished == plain.finished and fast.texts == plain.texts


# --------------------------------------------------------------------------- shared-prefix forward


def _grads(model, batch, share: bool):
    model.zero_grad()
    h = forward_hidden(model, batch, share_prefixes=share)
    sel = h[:, :-1][batch.completion_mask_BT[:, 1:].bool()]  # last prompt token + completion tokens
    # A fixed random readout (a squared norm would be nearly constant after the final RMSNorm).
    w = torch.randn(sel.shape, generator=torch.Generator().manual_seed(1), dtype=sel.dtype)
    (sel * w).sum().backward()
    return h.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", ["tree", "two-stage"])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_shared_prefix_forward_equals_plain_forward(arch, layout, monkeypatch):
    import selfdistill.sequences as seq

    if layout == "two-stage":
        monkeypatch.setattr(seq, "TREE_MASK_MAX", 0)
    model = tiny(arch, torch.float64).train()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (9, 4, 12)]
    P = [ps[0]] * 3 + [ps[1]] * 2 + [ps[2]] * 3
    C = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 7, 0, 6, 2, 3, 4)]
    batch = make_batch(P, C, pad_id=0)
    ref = model.get_decoder()(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT,
                              position_ids=batch.position_ids_BT).last_hidden_state
    h_plain, g_plain = _grads(model, batch, share=False)
    h_shared, g_shared = _grads(model, batch, share=True)
    real = batch.attention_mask_BT.bool()
    torch.testing.assert_close(h_plain[real], ref.detach()[real])
    torch.testing.assert_close(h_shared[real], ref.detach()[real])
    assert torch.all(h_shared[~real] == 0)
    assert [a is None for a in g_plain] == [b is None for b in g_shared]
    # transformers' RMSNorm computes in float32 even for a float64 model, so the two summation orders
    # agree to float32 rounding, relative to each gradient's scale.
    for a, b in zip(g_plain, g_shared):
        if a is not None:
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    model.eval()


def test_shared_prefix_skipped_when_nothing_is_shared():
    from selfdistill.sequences import _forward_shared_prefix

    model = tiny("qwen3")
    batch = make_batch([[5, 6, 7], [8, 9]], [[10, 11], [12]], pad_id=0)
    assert _forward_shared_prefix(model.get_decoder(), batch) is None


# --------------------------------------------------------------------------- folded projection


@pytest.mark.parametrize("d,rank", [(16, 3), (DENSE_MAX_DIM + 64, 8)])
@pytest.mark.parametrize("beta", [0.0, 0.4])
@pytest.mark.parametrize("centred", [True, False])
def test_projector_equals_project(d, rank, beta, centred):
    g = torch.Generator().manual_seed(d)
    U = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    mu = torch.randn(d, generator=g, dtype=torch.float64) if centred else None
    sub = Subspace(U.float(), mu.float() if mu is not None else None, torch.ones(1, rank), (rank,))
    h = torch.randn(2, 5, d, generator=g)
    want = project(h.double(), U, beta, mu)
    torch.testing.assert_close(projector(sub, beta)(h).double(), want, atol=1e-5, rtol=1e-5)
    hb = h.bfloat16()
    got_b = projector(sub, beta)(hb)
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(got_b.double(), project(hb, U.float(), beta, mu.float() if mu is not None else None
                                                       ).double(), atol=2e-2, rtol=2e-2)
    assert projector(sub, 1.0)(h) is h


def test_row_seeded_sampling_is_the_same_in_any_batch_and_in_both_loops(tiny_model_dir):
    """With per-row seeds a completion depends on its seed and prompt alone: alone or in a batch, in any order,
    in the lean loop or through transformers' generate (issue 14 item 6)."""
    from dataclasses import replace

    from selfdistill.config import ModelConfig
    from selfdistill.models import load_model
    from selfdistill.rollout import row_seed

    model, tok = load_model(ModelConfig(path=tiny_model_dir))
    prompts = ["1+2=", "hello there", "3*4", "x"]
    seeds = [row_seed(0, "t", 1, i, 0) for i in range(4)]
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95, batch_size=8)
    batch = generate(model, tok, prompts, cfg, row_seeds=seeds).completion_ids
    assert batch == generate(model, tok, prompts, replace(cfg, fast_decode=False), row_seeds=seeds).completion_ids
    assert batch == [generate(model, tok, [p], cfg, row_seeds=[s]).completion_ids[0] for p, s in zip(prompts, seeds)]
    assert batch == generate(model, tok, prompts[::-1], cfg, row_seeds=seeds[::-1]).completion_ids[::-1]
    other = generate(model, tok, prompts, cfg, row_seeds=[row_seed(1, "t", 1, i, 0) for i in range(4)])
    assert other.completion_ids != batch  # the seed matters
    with pytest.raises(ValueError, match="row_seeds"):
        generate(model, tok, prompts, cfg, row_seeds=seeds[:2])


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([1e-9, 0.5, 0.5000001, 1.0])
    assert fastgen.inverse_cdf(probs, u).tolist() == [1, 1, 3, 3]
