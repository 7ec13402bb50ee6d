"""Can the toy architecture learn to copy at all? Pretrain it on random-string copies only.

Usage: python scripts/toy_copy_pilot.py STEPS [OUT] [FIELD=VALUE ...] [text=digits|words]
(default OUT /tmp/toy-copy-pilot; FIELD=VALUE overrides a ``PretrainConfig`` field, e.g. ``lr=0.004
heads=8``; ``text=words`` copies strings of 3-40 distinct-looking words drawn from the tokenizer's ~185
whole-word tokens instead of the copy part's digit/word strings, where a token rarely repeats, so a
one-token induction match suffices)

A diagnostic for docs/toy_world.md: the shipped model does not copy text shown in its prompt
(scripts/toy_copy_probe.py). Here the same model and optimizer (``selfdistill toy pretrain``'s, with
4,096 tokens per step and a 30-step warm-up) read nothing but the copy part's digit/word strings, which
only a copy can predict (a digit costs ln 10 = 2.30 nats otherwise): the loss says whether and when
copying forms. It swaps the mixture's ``example`` for a copy-only one (the pretraining loop reads
examples through that one name).
"""

from __future__ import annotations

import random
import sys

import selfdistill.toy.pretrain as pretrain_mod
from selfdistill.toy import templates as T
from selfdistill.toy.mixture import _COPY_WORDS


TEXT = "digits"
_WORDS: list[str] = []


def copy_only(seed: int, index: int):
    rng = random.Random(f"pilot/{index}")
    if TEXT == "words":
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40)))
    else:
        text = " ".join(str(rng.randint(0, 9999)) if rng.random() < 0.6 else rng.choice(_COPY_WORDS)
                        for _ in range(rng.randint(3, 12)))
    return "copy", [{"role": "user", "content": T.COPY[0].format(text=text)},
                    {"role": "assistant", "content": text}], [True]


if __name__ == "__main__":
    steps = int(sys.argv[1])
    out = sys.argv[2] if len(sys.argv) > 2 and "=" not in sys.argv[2] else "/tmp/toy-copy-pilot"
    over = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
    TEXT = over.pop("text", "digits")
    if TEXT == "words":
        from selfdistill.toy.tokenizer import build_toy_tokenizer

        _WORDS.extend(sorted(w for w in build_toy_tokenizer().get_vocab() if w.isalpha() and len(w) > 1))
    pretrain_mod.example = copy_only
    cfg = pretrain_mod.PretrainConfig(steps=steps, warmup=30, save_every=0, checkpoint_every=100_000,
                                      tokens_per_step=4096)
    for k, v in over.items():
        setattr(cfg, k, type(getattr(cfg, k))(v))
    pretrain_mod.pretrain(out, cfg)
