"""GGUF -> Hugging Face conversion (finegrain.models.gguf) on a tiny GGUF file that the test writes itself.

The file is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama: tensor names from gguf-py's
``get_tensor_name_map`` (the map transformers reads them back with), q/k rows permuted into llama.cpp's rotary
layout, F32 tensors (so the round trip has no quantization error), and a byte-level BPE tokenizer as
``tokenizer.ggml.model = gpt2`` metadata (tokens, token types, merges, special ids, chat template).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from finegrain.errors import ConfigError  # noqa: E402
from finegrain.models.build import causal_lm_from_config  # noqa: E402
from finegrain.models.gguf import (  # noqa: E402
    GGUF_MARKER,
    check_gguf_file,
    convert_gguf,
    default_converted_dir,
    is_converted,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from _tiny_tokenizers import CHATML, bpe_tokenizer  # noqa: E402


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF rotate-half layout -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_llama(tok, *, tied: bool):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return causal_lm_from_config(cfg, seed=3).eval()


def write_gguf(path: Path, model, tok) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tok`` (a byte-level BPE fast tokenizer) as a GGUF file."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # tokenizer: byte-level BPE, as convert_hf_to_gguf's _set_vocab_gpt2 writes it
    state = json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = state["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(CHATML)
    # tensors: HF names -> GGUF names through gguf-py's map; q/k permuted as llama.cpp does
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = name_map.get_name(base)
        assert gguf_name is not None, name
        data = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        w.add_tensor(f"{gguf_name}.{suffix}", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("tied", [True, False])
def test_conversion_reproduces_the_source_model(tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = bpe_tokenizer(CHATML)
    source = _tiny_llama(tok, tied=tied)
    path = write_gguf(tmp_path / "tiny.gguf", source, tok)
    out = convert_gguf(path, tmp_path / "hf", verbose=False)

    assert (out / "model.safetensors").is_file() and (out / GGUF_MARKER).is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is tied
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 17, 42, 3, 99, 7, 1, 60], [8, 8, 9, 120, 4, 30, 2, 11]])
    with torch.no_grad():
        want, got = source(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # F32 in the file: only summation-order error
    # the tokenizer: same ids and offsets as the source, and its chat template
    loaded = AutoTokenizer.from_pretrained(out)
    text = "what color is the sky? the sky is blue, héllo 🙂"
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.eos_token == tok.eos_token
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_second_call_is_instant_and_a_changed_source_is_converted_again(tmp_path):
    tok = bpe_tokenizer(CHATML)
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_llama(tok, tied=True), tok)
    out = convert_gguf(path, verbose=False)
    assert out == default_converted_dir(path) and str(out).startswith(str(tmp_path / "cache"))
    marker = json.loads((out / GGUF_MARKER).read_text())
    assert marker["size"] == path.stat().st_size and len(marker["sha256"]) == 64
    before = (out / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_gguf(path, verbose=False) == out
    assert time.perf_counter() - start < 0.5  # no model is loaded
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    # a new file at the same path (different weights, new mtime) is converted again
    write_gguf(path, _tiny_llama(tok, tied=False), tok)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not is_converted(path, out)
    convert_gguf(path, verbose=False)
    assert is_converted(path, out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_loading_a_gguf_path_converts_it_into_the_cache(tmp_path):
    from finegrain.models.loading import load_causal_lm, load_tokenizer

    tok = bpe_tokenizer(CHATML)
    source = _tiny_llama(tok, tied=True)
    path = write_gguf(tmp_path / "tiny.gguf", source, tok)
    model = load_causal_lm(str(path)).eval()
    loaded = load_tokenizer(str(path))
    assert is_converted(path, default_converted_dir(path))
    ids = torch.tensor([[5, 17, 42, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, source(input_ids=ids).logits, rtol=0, atol=1e-5)
    assert loaded.pad_token_id == tok.pad_token_id


def test_a_half_written_conversion_never_looks_complete(tmp_path):
    tok = bpe_tokenizer(CHATML)
    path = write_gguf(tmp_path / "tiny.gguf", _tiny_llama(tok, tied=True), tok)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. a killed copy: files but no marker
    assert not is_converted(path, out)
    with pytest.raises(ConfigError, match="not a finegrain GGUF conversion"):
        convert_gguf(path, out, verbose=False)
    # an interrupted conversion leaves only a temporary sibling, which is not the output
    (tmp_path / ".hf2.tmp-123").mkdir()
    assert not is_converted(path, tmp_path / "hf2")
    assert is_converted(path, convert_gguf(path, tmp_path / "hf2", verbose=False))


def test_bad_files_get_clear_errors(tmp_path):
    tok = bpe_tokenizer(CHATML)
    good = write_gguf(tmp_path / "tiny.gguf", _tiny_llama(tok, tied=True), tok)
    assert check_gguf_file(good) == good.resolve()

    missing = tmp_path / "missing.gguf"
    with pytest.raises(ConfigError, match="does not exist"):
        convert_gguf(missing, verbose=False)

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip file, not a GGUF")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        convert_gguf(not_gguf, verbose=False)

    data = good.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 40):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ConfigError, match=r"truncated|not a readable GGUF"):
            convert_gguf(truncated, verbose=False)
        assert not default_converted_dir(truncated).exists()

    with pytest.raises(ConfigError, match=r"\.gguf"):
        convert_gguf(tmp_path / "model.bin", verbose=False)
