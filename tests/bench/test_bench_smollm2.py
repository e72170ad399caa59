"""The real-model benchmark (finegrain bench smollm2): SmolLM2-135M's FLOPs by hand, the step FLOPs of every
po_vs_trl configuration, the model it resolves, the profiler summary, and a tiny run of some parts."""

from __future__ import annotations

import pytest
import torch

from finegrain.bench.synthetic import SMOLLM2_135M, LlamaShape, build_model
from finegrain.models.flops import ModelFlops, lora_params, model_flops

D, LAYERS, HEADS, KV, INTER, VOCAB = 576, 30, 9, 3, 1536, 49152


def _smollm2_meta():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(SMOLLM2_135M.config(2048))


def test_smollm2_flops_by_hand():
    """Per layer: q and o are d x d, k and v d x (3 x 64), gate, up and down d x 1536; the head 49,152 x 576 (tied to
    the embedding, so the model has one copy); attention width 9 x 64 = 576."""
    model = _smollm2_meta()
    kv = KV * (D // HEADS)
    body = LAYERS * (2 * D * D + 2 * D * kv + 3 * D * INTER)
    head = VOCAB * D
    assert (body, head) == (106_168_320, 28_311_552)
    assert model_flops(model) == ModelFlops(body_params=body, head_params=head, layers=LAYERS, attn_width=D)
    # all parameters: the layers, one tied embedding/head, 2 RMSNorms per layer and the final one
    assert sum(p.numel() for p in model.parameters()) == body + head + D * (2 * LAYERS + 1) == 134_515_008
    # rank-16 adapters on the 7 linear layers of every block: r (d_in + d_out) each
    per_layer = 16 * (2 * (D + D) + 2 * (D + kv) + 3 * (D + INTER))
    assert lora_params(model, 16) == LAYERS * per_layer == 4_884_480


def test_training_flops_full_and_lora_by_hand():
    f = ModelFlops(body_params=10, head_params=5, layers=2, attn_width=4)
    weights, attention = 2 * 10 * 3 + 2 * 5 * 2, 4 * 2 * 4 * 3**2  # 3 tokens, the head at 2 of them
    assert f.forward(3, 2) == weights + attention
    assert f.train(3, 2) == 3 * (weights + attention)
    # LoRA: frozen weights' backward is the input gradient only (one forward), attention's is still two forwards,
    # the adapters' 7 weights cost forward + input gradient + weight gradient, 2 FLOPs per weight and token each
    assert f.train(3, 2, lora_params=7) == 2 * weights + 3 * attention + 6 * 7 * 3


def test_po_step_flops_of_every_configuration():
    from finegrain.bench.po_vs_trl import CONFIGS, step_flops

    f = ModelFlops(body_params=100, head_params=50, layers=2, attn_width=8)
    counts = [(4, 3, 5), (6, 2, 2)]  # (prompt, chosen, rejected) tokens
    batch, lora = 3, 11

    def by_hand(config):
        per_pair = []
        for p, c, r in counts:
            lw = lora if config.endswith("lora") else None
            flops = f.train(p + c, c, lora_params=lw) + f.train(p + r, r, lora_params=lw)
            if not config.endswith("precomputed"):
                flops += f.forward(p + c, c) + f.forward(p + r, r)
            per_pair.append(flops)
        return batch * sum(per_pair) / len(per_pair)

    for config in CONFIGS:
        assert step_flops(f, counts, batch, config, lora) == pytest.approx(by_hand(config))
    assert step_flops(f, counts, batch, "finegrain-dpo", lora) == pytest.approx(
        batch * sum(4 * (f.forward(p + c, c) + f.forward(p + r, r)) for p, c, r in counts) / 2)


def test_resolve_model(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from finegrain.bench import smollm2
    from finegrain.ifeval import model as ifeval_model

    path, source = smollm2.resolve_model("config", tmp_path, layers=1)
    c = AutoConfig.from_pretrained(path)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings) == (D, 1, HEADS, KV, INTER, VOCAB, True)
    assert "random weights" in source
    monkeypatch.setattr(ifeval_model, "is_model_ready", lambda cache_dir=None: False)
    with pytest.raises(ValueError, match="ifeval build"):
        smollm2.resolve_model("real", tmp_path)
    assert smollm2.resolve_model("auto", tmp_path / "auto")[1].startswith("SmolLM2-135M's architecture")
    assert smollm2.resolve_model(path, tmp_path)[0] == path
    with pytest.raises(ValueError, match="model must be"):
        smollm2.resolve_model(str(tmp_path / "missing"), tmp_path)


def test_single_token_words_give_exact_lengths():
    """Texts of the chosen words have one token per word, so pair_token_counts with the tokenizer matches the word
    tokenizer's own count."""
    from finegrain.bench.synthetic import pair_token_counts, random_pairs, single_token_words, word_tokenizer

    tok = word_tokenizer(600)
    words = single_token_words(tok, limit=200)
    assert len(words) == 200 and all(len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    rows = random_pairs(5, 600, 7, 12, words=words)
    assert pair_token_counts(rows, tok) == pair_token_counts(rows)


def test_profile_summary_counts_matmul_flops():
    from finegrain.bench.profiling import step_profiler, summarize

    a, b = torch.randn(64, 32), torch.randn(32, 48)
    with step_profiler(skip=1) as prof:
        for _ in range(3):
            (a @ b).relu_()
            prof.step()
    out = summarize(prof)
    assert out["matmul_flops"] == 2 * 64 * 32 * 48  # one recorded step: one product
    assert sum(out["share"].values()) == pytest.approx(1.0)
    assert out["share"]["matmul"] > 0 and out["top_ops"]


def test_tiny_run_of_roofline_memory_and_rollout(tmp_path):
    """The parts that need neither TRL nor training, on a 1-layer SmolLM2-shaped model (about 30 s on 2 cores)."""
    from finegrain.bench import smollm2

    result = smollm2.run(model="config", layers=1, parts=("roofline", "tdpo_memory", "rollout"), mem_rows=2,
                         mem_seq_len=32, mem_chunk_size=16, rollout_batch=2, min_prompt=2, max_prompt=4, new_tokens=4,
                         repeats=1, matmul_size=128, threads=1, workdir=str(tmp_path))
    assert not result["errors"], result["errors"]
    assert set(result["ratios"]) == {"chunked/naive_peak_memory", "sampler/generate_tok_s"}
    assert result["figures"]["matmul_peak_gflops"]["value"] > 0
    assert result["figures"]["tdpo_worst_relative_difference"]["value"] < 1e-4
    assert result["settings"]["layers"] == 1 and result["settings"]["vocab"] == VOCAB
    assert set(result["targets"]) == {"chunked/naive_peak_memory", "sampler/generate_tok_s"}


def test_a_failing_part_keeps_the_others(tmp_path, monkeypatch):
    from finegrain.bench import rollout_throughput, smollm2

    def boom(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(rollout_throughput, "run", boom)
    result = smollm2.run(model="config", layers=1, parts=("roofline", "rollout"), matmul_size=64, threads=1,
                         workdir=str(tmp_path))
    assert result["errors"] == {"rollout": "RuntimeError: boom"}
    assert "matmul_peak_gflops" in result["figures"]


def test_lora_params_counts_peft_targets():
    """lora_params agrees with the trainable parameters peft adds with target_modules="all-linear"."""
    from finegrain.models.build import apply_lora

    model = build_model(LlamaShape(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, vocab=50), 16)
    expected = lora_params(model, 4)
    peft_model = apply_lora(model, 4, 8, 0.0, ["all-linear"])
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected
