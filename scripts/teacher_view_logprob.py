"""How well does a teacher view predict the reference solution, vs the plain prompt?

Mean log-prob per token of each item's reference solution behind the student
prompt and behind the OPSD teacher template, on the toy valid split. A
privileged-context teacher can only help if the second is higher.

    python scripts/teacher_view_logprob.py [--model.path DIR] [--n 40]
"""

from __future__ import annotations

import argparse

import torch

from selfdistill.config import ModelConfig
from selfdistill.method_configs import OPSD_TEMPLATE
from selfdistill.models import load_model
from selfdistill.objectives import token_logprobs_from_hidden
from selfdistill.scoring import lm_head
from selfdistill.sequences import chat_prompt, encode_prompts, forward_hidden, make_batch
from selfdistill.toy.tasks import make_item


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model.path", dest="path", default="toy")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()
    model, tok = load_model(ModelConfig(path=args.path))
    model.eval()
    views = {"student": lambda it: it.prompt,
             "opsd-teacher": lambda it: OPSD_TEMPLATE.format(problem=it.prompt, solution=it.solution)}
    print("domain  view          mean log p(reference token)")
    for d in ("math", "code", "mcqa"):
        items = [make_item(d, "valid", i) for i in range(args.n)]
        comp = [tok(it.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for it in items]
        for name, view in views.items():
            batch = make_batch(encode_prompts(tok, [chat_prompt(tok, view(it)) for it in items]), comp,
                               tok.pad_token_id)
            with torch.no_grad():
                hidden = forward_hidden(model, batch)[:, :-1]
                lp = token_logprobs_from_hidden(hidden, lm_head(model), batch.input_ids_BT[:, 1:])
            mask = batch.completion_mask_BT[:, 1:].float()
            print(f"{d:<7} {name:<13} {float((lp * mask).sum() / mask.sum()):.3f}")


if __name__ == "__main__":
    main()
