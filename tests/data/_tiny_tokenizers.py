"""Tiny fast tokenizers built in-process (no downloads) for the data-layer tests.

* :func:`word_tokenizer`: word level, whitespace/punctuation pre-tokenizer, ids fixed by :data:`WORDS`
  (``[PAD]`` 0, ``[BOS]`` 1, ``[EOS]`` 2, ``[UNK]`` 3, then the words from 4), BOS added to every text
  tokenized with special tokens (like Llama);
* :func:`bpe_tokenizer`: byte-level BPE trained on a small corpus, ``<|endoftext|>`` as EOS and pad and no BOS
  (like GPT-2 / Qwen).

Both optionally carry a ChatML-like chat template.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "is", "blue", "red", "sky", "what", "color", "?", ".", "a", "b", "c", "d"]
VOCAB = {w: i for i, w in enumerate(SPECIALS + WORDS)}

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "the cat sat on the mat.",
    "what color is the sky? the sky is blue.",
    "héllo wörld, naïve café — 你好世界 🙂",
    "<|user|>hi\n<|assistant|>hello there",
]


def word_tokenizer(chat_template: str | None = None, *, bos: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(dict(VOCAB), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]" if bos else None,
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
    )
    out.chat_template = chat_template
    return out


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return tok.to_str()


def bpe_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    out = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe()), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    out.chat_template = chat_template
    return out
