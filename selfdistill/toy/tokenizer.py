"""The toy model's tokenizer: character level, built with ``tokenizers``.

Character level keeps every digit its own token (arithmetic stays learnable
by a tiny model) and needs no training. It is wrapped as a
``PreTrainedTokenizerFast`` with a ChatML-style chat template, so it behaves
like any Hugging Face chat tokenizer (``apply_chat_template``, EOS, padding).
"""

from __future__ import annotations

import string

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


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic character-level chat tokenizer over printable ASCII."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # One token per character, newlines included ("." alone would leave runs of
    # newlines unsplit); special tokens are matched before this runs.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=UNK,
        bos_token=None,
        additional_special_tokens=[EOS, IM_START],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    return hf
