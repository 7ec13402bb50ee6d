"""Greedy exact-copy accuracy of a toy model on the pretraining mixture's copy part, by length.

Usage: python scripts/toy_copy_probe.py [MODEL_DIR] (default: the shipped toy model). A diagnostic for
the toy world's reading preconditions (docs/toy_world.md): can the model copy text shown in its prompt?
Prints exact greedy copies and the teacher-forced loss of the copy (nats per token; more sensitive early
in pretraining).
"""

from __future__ import annotations

import random
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.toy import templates as T
from selfdistill.toy.mixture import copy_text
from selfdistill.toy.pretrain import DEFAULT_MODEL_DIR


def main(path: str, n: int = 12) -> None:
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for max_tokens in (16, 60, 200):
        ok, nll, count = 0, 0.0, 0
        for i in range(n):
            text = copy_text(random.Random(f"probe/{max_tokens}/{i}"), 0, max_tokens).strip()
            ids = tok.apply_chat_template([{"role": "user", "content": T.COPY[0].format(text=text)}],
                                          add_generation_prompt=True, return_tensors="pt")
            ids = ids if torch.is_tensor(ids) else ids["input_ids"]
            out = model.generate(ids, max_new_tokens=len(tok(text)["input_ids"]) + 5, do_sample=False)
            got = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            ok += got == text
            target = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            full = torch.cat([ids, target], 1)
            with torch.no_grad():
                logp = model(full).logits[0, ids.shape[1] - 1:-1].float().log_softmax(-1)
            nll -= float(logp.gather(-1, target[0][:, None]).sum())
            count += target.shape[1]
            if i == 0:
                print(f"  shown {text[:70]!r}\n  wrote {got[:70]!r}")
        print(f"copies of at most ~{max_tokens} tokens: {ok}/{n} exact, teacher-forced copy loss "
              f"{nll / count:.3f} nats/token")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_MODEL_DIR))
