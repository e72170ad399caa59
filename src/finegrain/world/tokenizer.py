"""The world's word-level tokenizer, as a Hugging Face fast tokenizer.

One token per word (words are separated by whitespace; ``.`` ``,`` ``:`` are words), ``<bos>`` prepended when
special tokens are added, ``<pad>`` / ``<eos>`` / ``<unk>`` specials, and a chat template so conversational
data work too (the template starts with ``<bos>``, so a rendered conversation is tokenized without adding special
tokens again). Character offsets come from the whitespace pre-tokenizer, so token ``i`` of a response is word ``i``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from finegrain.world.lexicon import vocabulary

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """Build the world tokenizer (a ``transformers.PreTrainedTokenizerFast``)."""
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        padding_side="right",
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
