"""Synthetic inputs shared by the benchmarks: Llama configs (small CPU shapes and a ~1B GPU shape), a word-level
tokenizer, random preference pairs and a saved model directory. Nothing is downloaded: every model has random
weights built from a config, every text is random words of the tokenizer's vocabulary.
"""

from __future__ import annotations

import json
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


def random_pairs(n: int, vocab_size: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """``n`` rows ``{prompt, chosen, rejected}`` of random words: prompts of ``prompt_len`` words, responses of
    ``response_len // 2 .. response_len`` words. Responses start with a space, so that the prompt stays a token
    prefix of prompt + response when a trainer (TRL) joins the strings."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    lo = max(1, response_len // 2)
    return [{"prompt": text(prompt_len), "chosen": " " + text(rng.randint(lo, response_len)),
             "rejected": " " + text(rng.randint(lo, response_len))} for _ in range(n)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def preference_inputs(root: Path, shape: LlamaShape, *, prompt_len: int, response_len: int, pairs: int,
                      seed: int = 0) -> tuple[Path, Path]:
    """Save a random Llama of ``shape`` with the word tokenizer to ``root/model`` and ``pairs`` random pairs to
    ``root/pairs.jsonl``; returns both paths. The model is saved in float32 (mixed precision keeps float32
    master weights)."""
    model_dir = root / "model"
    max_positions = prompt_len + response_len + 8
    build_model(shape, max_positions, seed=seed).save_pretrained(model_dir)
    word_tokenizer(shape.vocab).save_pretrained(model_dir)
    data = write_jsonl(random_pairs(pairs, shape.vocab, prompt_len, response_len, seed), root / "pairs.jsonl")
    return model_dir, data


def pair_token_counts(rows: list[dict]) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of each row under the word tokenizer: BOS + prompt words, and
    response words + EOS (what both finegrain and TRL feed the model)."""
    return [(1 + len(r["prompt"].split()), len(r["chosen"].split()) + 1, len(r["rejected"].split()) + 1) for r in rows]
