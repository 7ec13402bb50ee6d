"""The toy model's tokenizer: whole words for template text, single characters for the rest.

Digits stay single characters (arithmetic stays learnable by a tiny model);
every word of the toy world's text (templates, questions, skill tags,
record fields) is one token, with and without a leading space, so a 250-
character teacher template costs tens of tokens, not hundreds. Anything
else falls back to one token per character, so every printable ASCII text
encodes. Built with ``tokenizers`` (a regex pre-tokenizer over a fixed word
list, then a word-level vocabulary), wrapped as a ``PreTrainedTokenizerFast``
with a ChatML chat template.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, IM_START, IM_END, UNK = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIALS = [PAD, EOS, IM_START, IM_END, UNK]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]


@lru_cache(maxsize=1)
def toy_words() -> tuple[str, ...]:
    """The word list of the toy tokenizer: every 2+-letter word the toy world writes (sorted)."""
    from selfdistill.toy import templates as T
    from selfdistill.toy.mixture import SHARES, example

    text: list[str] = []
    for kind, tpls in T.PRETRAIN.items():
        text += tpls
    text += list(T.HELD_OUT.values()) + list(T.ACKS) + [T.CRITIQUE_MARK, T.MISSING_MARK]
    text += ["system user assistant"]  # the chat template's role names (v4 spelled them letter by letter)
    for i in range(4000):
        _, msgs, _ = example(0, i)
        text += [m["content"] for m in msgs]
    from selfdistill.toy.tasks import SPLITS, make_item

    for d in ("math", "code", "mcqa", "records"):
        for s in SPLITS:
            for i in range(200):
                it = make_item(d, s, i)
                text += [it.prompt, it.solution, *it.meta.get("shards", [])]
    assert SHARES
    found: set[str] = set()
    for t in text:
        found |= T.words(re.sub(r"\{\w+\}", " ", t))  # placeholders are not words
    return tuple(sorted(found))


def build_toy_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """The toy chat tokenizer: specials, printable characters, then ``words`` and `` words`` (deterministic)."""
    words = sorted(set(toy_words() if words is None else words))
    vocab_list = SPECIALS + _CHARS + [w for w in words] + [" " + w for w in words]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Longest words first so that alternation prefers them; a word never ends inside a longer word.
    alts = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
    pattern = f"(?: ?(?:{alts}))(?![A-Za-z])|[\\s\\S]" if alts else "[\\s\\S]"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, unk_token=UNK, bos_token=None,
        additional_special_tokens=[EOS, IM_START], chat_template=CHAT_TEMPLATE, padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False,
    )


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The v1 character-level tokenizer (tiny test models)."""
    return build_toy_tokenizer(words=[], model_max_length=512)
