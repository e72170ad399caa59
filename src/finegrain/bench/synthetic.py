"""Synthetic inputs shared by the benchmarks: Llama configs (small CPU shapes and a ~1B GPU shape), a word-level
tokenizer, random preference pairs and a saved model directory. Nothing is downloaded: every model has random
weights built from a config, every text is random words of the tokenizer's vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS = 0, 1, 2


@dataclass(frozen=True)
class LlamaShape:
    """The shape of a Llama decoder; ``kv_heads`` < ``heads`` is grouped-query attention."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int = 16000
    tie_embeddings: bool = True

    def config(self, max_positions: int, *, attn_implementation: str | None = None):
        """A ``transformers.LlamaConfig`` of this shape (pad 0, BOS 1, EOS 2, no dropout)."""
        from transformers import LlamaConfig

        config = LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate or 4 * self.hidden,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads, max_position_embeddings=max_positions,
            rms_norm_eps=1e-6, tie_word_embeddings=self.tie_embeddings, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS, attention_dropout=0.0,
        )
        if attn_implementation:
            config._attn_implementation = attn_implementation
        return config

    def as_dict(self) -> dict:
        return asdict(self)


# TinyLlama-1.1B's shape (22 layers, hidden 2048, grouped-query attention with 4 key/value heads, vocabulary 32,000,
# untied embeddings): 1.10e9 parameters. The GPU path trains and samples it with random weights.
LLAMA_1B = LlamaShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000,
                      tie_embeddings=False)

# SmolLM2-135M's shape (30 layers, hidden 576, 9 heads of 64 with 3 key/value heads, MLP 1536, vocabulary 49,152, tied
# embeddings): 1.345e8 parameters. The real-model benchmark uses it with random weights when the converted model of
# docs/ifeval.md is absent.
SMOLLM2_135M = LlamaShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                          tie_embeddings=True)


def build_model(shape: LlamaShape, max_positions: int, *, seed: int = 0, attn_implementation: str | None = None):
    """A randomly initialised Llama causal LM of ``shape`` (deterministic weights for a seed)."""
    from finegrain.models.build import causal_lm_from_config

    return causal_lm_from_config(shape.config(max_positions, attn_implementation=attn_implementation), seed=seed)


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ``w0 .. w{V-5}`` plus pad/bos/eos/unk (ids 0-3); BOS is prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + [f"w{i}" for i in range(vocab_size - len(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def random_pairs(n: int, vocab_size: int, prompt_len: int, response_len: int, seed: int = 0,
                 words: list[str] | None = None) -> list[dict]:
    """``n`` rows ``{prompt, chosen, rejected}`` of random words: prompts of ``prompt_len`` words, responses of
    ``response_len // 2 .. response_len`` words. Responses start with a space, so that the prompt stays a token
    prefix of prompt + response when a trainer (TRL) joins the strings. ``words``: the words to draw from (default:
    the word tokenizer's ``w0 .. w{V-5}``; :func:`single_token_words` gives them for a real tokenizer)."""
    rng = random.Random(seed)
    words = list(words) if words is not None else [f"w{i}" for i in range(vocab_size - len(SPECIALS))]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    lo = max(1, response_len // 2)
    return [{"prompt": text(prompt_len), "chosen": " " + text(rng.randint(lo, response_len)),
             "rejected": " " + text(rng.randint(lo, response_len))} for _ in range(n)]


def preference_inputs(root: Path, shape: LlamaShape, *, prompt_len: int, response_len: int, pairs: int,
                      seed: int = 0) -> tuple[Path, Path]:
    """Save a random Llama of ``shape`` with the word tokenizer to ``root/model`` and ``pairs`` random pairs to
    ``root/pairs.jsonl``; returns both paths. The model is saved in float32 (mixed precision keeps float32
    master weights)."""
    from finegrain.data.files import write_jsonl

    model_dir = root / "model"
    max_positions = prompt_len + response_len + 8
    build_model(shape, max_positions, seed=seed).save_pretrained(model_dir)
    word_tokenizer(shape.vocab).save_pretrained(model_dir)
    data = write_jsonl(root / "pairs.jsonl", random_pairs(pairs, shape.vocab, prompt_len, response_len, seed))
    return model_dir, data


def single_token_words(tokenizer, limit: int = 4000) -> list[str]:
    """Up to ``limit`` lower-case words (3-10 letters or digits, starting with a letter) that ``tokenizer`` encodes, after a space, as exactly one token
    (in vocabulary order, so the list is the same on every machine). Text made of them has one token per word, so a
    real tokenizer's sequence lengths are set exactly as the word tokenizer's are."""
    import re

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    candidates = []
    for piece, _ in vocab:
        word = tokenizer.convert_tokens_to_string([piece]).strip()
        if re.fullmatch(r"[a-z][a-z0-9]{2,9}", word) and word not in candidates:
            candidates.append(word)
        if len(candidates) >= 4 * limit:
            break
    out = [w for w in candidates if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1
           and len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    if len(out) < 100:
        raise ValueError(f"the tokenizer has only {len(out)} single-token words; use the word tokenizer")
    return out[:limit]


def pair_token_counts(rows: list[dict], tokenizer=None) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of each row as both finegrain and TRL feed the model: the prompt
    tokenized with special tokens (BOS where the tokenizer adds one), each response alone plus EOS. Without
    ``tokenizer``: the word tokenizer's counts, BOS + prompt words and response words + EOS."""
    if tokenizer is None:
        return [(1 + len(r["prompt"].split()), len(r["chosen"].split()) + 1, len(r["rejected"].split()) + 1)
                for r in rows]

    def n(text: str, special: bool) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    return [(n(r["prompt"], True), n(r["chosen"], False) + 1, n(r["rejected"], False) + 1) for r in rows]
