"""Where SafeSteer's unrenormalised loss pushes the student, measured on its own rollouts.

Per completion position and safety token v, the loss p_S(v) (log p_S(v) - log p_T(v)) has its minimum over
p_S(v) at p_T(v) / e: it raises p_S(v) only where p_S(v) < p_T(v) / e and lowers it everywhere else, also on
tokens the steered teacher prefers. This script samples the student's rollouts on the training prompts (as
one SafeSteer step does) and reports, for the first completion position and for all positions, the student's
and the steered teacher's mass on the safety tokens and the share of (position, token) pairs the loss pushes
down.

    python scripts/safesteer_fixed_point.py [MODEL] [TABLE_FOLDER]   # default: runs/toy-v3, results/v3/safesteer
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from selfdistill.config import ModelConfig
from selfdistill.methods.safesteer import steering_coeff
from selfdistill.methods.safesteer.direction import load_direction
from selfdistill.methods.safesteer.tokens import load_tokens
from selfdistill.models import load_model
from selfdistill.residual import add_direction
from selfdistill.rollout import SamplingConfig, generate
from selfdistill.scoring import lm_head
from selfdistill.sequences import chat_prompt, forward_hidden, make_batch
from selfdistill.tasks.refusal import RefusalTask


def main(model_path: str, folder: Path) -> None:
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(path=model_path))
    model.eval()
    d, toks = load_direction(folder / "direction"), load_tokens(folder / "direction" / "tokens.json")
    ids = torch.tensor(toks.ids)
    items = RefusalTask("toy-refusal").items("train")[:32]
    prompts = [chat_prompt(tok, it.prompt) for it in items for _ in range(4)]
    ro = generate(model, tok, prompts, SamplingConfig(max_new_tokens=32, temperature=1.0, top_p=1.0, top_k=0),
                  generator_seed=0)
    batch = make_batch(ro.prompt_ids, ro.completion_ids, tok.pad_token_id)
    mask = batch.completion_mask_BT[:, 1:].bool()
    first = mask & (mask.long().cumsum(-1) == 1)
    head = lm_head(model).to(torch.float32)
    with torch.no_grad():
        hs = forward_hidden(model, batch)[:, :-1]
        with add_direction(model, d.layer, d.vector, steering_coeff(d)):
            ht = forward_hidden(model, batch)[:, :-1]
    for name, m in (("first completion token", first), ("all completion tokens", mask)):
        ps = torch.softmax(head.logits(hs[m]), -1)[:, ids]
        pt = torch.softmax(head.logits(ht[m]), -1)[:, ids]
        down = (ps > pt / math.e).float().mean()
        print(f"{name} ({int(m.sum())} positions): mass on the {len(ids)} safety tokens student "
              f"{ps.sum(-1).mean():.3f}, steered teacher {pt.sum(-1).mean():.3f}; "
              f"pairs the loss pushes down (p_S > p_T/e): {100 * down:.1f}%")
        if m is first:
            for j, v in enumerate(toks.ids):
                print(f"  {tok.decode([v])!r}: student {ps[:, j].mean():.3f}, steered teacher {pt[:, j].mean():.3f}, "
                      f"pushed down at {100 * (ps[:, j] > pt[:, j] / math.e).float().mean():.0f}% of positions")
    refusing = [t for t in ro.texts if t.strip().startswith(("I", "Sorry"))]
    print(f"rollouts opening with a refusal token: {len(refusing)}/{len(ro.texts)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/toy-v3",
         Path(sys.argv[2] if len(sys.argv) > 2 else "results/v3/safesteer"))
