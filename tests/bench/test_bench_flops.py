"""Model FLOPs and MFU against hand computations, and the peak-FLOPs table."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from finegrain.bench.synthetic import LLAMA_1B, LlamaShape, build_model
from finegrain.models.flops import ModelFlops, mfu, model_flops, peak_bf16_flops


@pytest.mark.parametrize("name, device, peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312e12),
    ("NVIDIA L40S", "L40S", 362e12),
    ("NVIDIA L4", "L4", 121e12),
])
def test_peak_table(name, device, peak):
    assert peak_bf16_flops(name) == (device, peak)


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090", "Tesla T4", "AMD Instinct MI300X", ""])
def test_unknown_device_has_no_peak(name):
    assert peak_bf16_flops(name) is None


def _hand_llama_params(d: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int) -> tuple[int, int]:
    """Matmul weights of a Llama: per layer q and o are d x d, k and v are d x (kv_heads * d / heads), the MLP's
    gate, up and down are d x inter each; the LM head is vocab x d."""
    kv = kv_heads * (d // heads)
    return layers * (2 * d * d + 2 * d * kv + 3 * d * inter), vocab * d


def test_model_flops_counts_matmul_weights_of_a_tiny_llama():
    model = build_model(LlamaShape(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48, vocab=50), 16)
    body, head = _hand_llama_params(32, 3, 4, 2, 48, 50)
    assert model_flops(model) == ModelFlops(body_params=body, head_params=head, layers=3, attn_width=32)


def test_the_1b_shape_has_1_1e9_parameters():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(LLAMA_1B.config(1024))
    body, head = _hand_llama_params(2048, 22, 32, 4, 5632, 32000)
    assert body == 968_884_224 and head == 65_536_000
    assert model_flops(model) == ModelFlops(body, head, 22, 2048)
    total = sum(p.numel() for p in model.parameters())
    assert total == body + head + 32000 * 2048 + 2048 * (2 * 22 + 1)  # + input embedding + RMSNorm weights
    assert 1.0e9 < total < 1.2e9


def test_forward_and_decode_flops_by_hand():
    f = ModelFlops(body_params=10, head_params=5, layers=2, attn_width=4)
    # 2 * 10 * 3 (body, 3 tokens) + 2 * 5 * 2 (head at 2 positions) + 4 * 2 * 4 * 3^2 (attention, full square)
    assert f.forward(3, 2) == 60 + 20 + 288
    assert f.forward(3) == 60 + 30 + 288
    # one token at context 7: 2 * (10 + 5) + 4 * 2 * 4 * 7
    assert f.decode(7) == 30 + 224


def test_mfu_by_hand():
    # a 1.1e9-parameter model training 6 * N * tokens FLOPs: 100k tokens in 2 s on a 989 TFLOP/s device
    flops = 6 * 1.1e9 * 100_000
    assert mfu(flops, 2.0, 989e12) == pytest.approx(6.6e14 / 2 / 989e12)
    assert mfu(flops, 2.0, 989e12) == pytest.approx(0.33367, abs=1e-5)
    with pytest.raises(ValueError):
        mfu(flops, 0.0, 989e12)


def test_po_throughput_mfu_matches_a_hand_computation(tmp_path, monkeypatch):
    """po_vs_trl's tokens/s and MFU on a (pretended) H100: tokens per step = batch x mean(2 prompt + chosen +
    rejected tokens); FLOPs per step = batch x mean over pairs of 4 F (policy 3 F + reference F) for a live
    reference, 3 F for a precomputed one; F of a row = forward(prompt + response tokens, head at the response)."""
    from finegrain.bench import po_vs_trl
    from finegrain.bench.synthetic import preference_inputs

    shape = LlamaShape(hidden=32, layers=2, heads=4, vocab=60)
    model_dir, data = preference_inputs(tmp_path, shape, prompt_len=5, response_len=8, pairs=6)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    s = {"device": "cuda", "batch": 3}
    out, notes = po_vs_trl._throughput(s, model_dir, data, {"finegrain-dpo": 0.5, "finegrain-dpo-precomputed": 0.25})
    assert notes == []

    body, head = _hand_llama_params(32, 2, 4, 4, 128, 60)
    rows = [json.loads(line) for line in data.read_text().splitlines()]

    def forward(n, h):
        return 2 * body * n + 2 * head * h + 4 * 2 * 32 * n * n

    pairs = [(1 + len(r["prompt"].split()), len(r["chosen"].split()) + 1, len(r["rejected"].split()) + 1) for r in rows]
    # the word tokenizer gives these counts: BOS + prompt words, response words + EOS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert pairs == [(len(tok(r["prompt"])["input_ids"]), len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) + 1,
                      len(tok(r["rejected"], add_special_tokens=False)["input_ids"]) + 1) for r in rows]
    tokens = 3 * statistics.fmean(2 * p + c + r for p, c, r in pairs)
    f = 3 * statistics.fmean(forward(p + c, c) + forward(p + r, r) for p, c, r in pairs)
    live, pre = out["finegrain-dpo"], out["finegrain-dpo-precomputed"]
    assert live["tokens_per_s"] == pytest.approx(tokens / 0.5)
    assert live["model_flops_per_step"] == pytest.approx(4 * f)
    assert live["mfu"] == pytest.approx(4 * f / 0.5 / 989e12)
    assert pre["mfu"] == pytest.approx(3 * f / 0.25 / 989e12)
    assert live["peak_device"] == "H100 SXM"


def test_po_throughput_without_a_known_peak_omits_mfu(tmp_path, monkeypatch):
    from finegrain.bench import po_vs_trl
    from finegrain.bench.synthetic import preference_inputs

    model_dir, data = preference_inputs(tmp_path, LlamaShape(hidden=16, layers=1, heads=2, vocab=40), prompt_len=3,
                                        response_len=4, pairs=2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    out, notes = po_vs_trl._throughput({"device": "cuda", "batch": 1}, model_dir, data, {"finegrain-dpo": 1.0})
    assert "mfu" not in out["finegrain-dpo"] and "Some Future GPU" in notes[0]


def test_rollout_decode_flops_by_hand():
    """Prefill of each prompt (head at its last position) plus one cached forward per counted token."""
    from finegrain.bench.rollout_throughput import _decode_flops

    model = build_model(LlamaShape(hidden=16, layers=1, heads=2, vocab=40), 32)
    f = model_flops(model)
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    counts = torch.tensor([2, 0])
    expected = f.forward(2, 1) + f.decode(2) + f.decode(3) + f.forward(3, 1)
    assert _decode_flops(model, attn, counts) == pytest.approx(expected)


def test_counted_tokens_stop_at_the_first_eos():
    from finegrain.bench.rollout_throughput import counted_tokens
    from finegrain.bench.synthetic import EOS, PAD

    tokens = torch.tensor([[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    assert counted_tokens(tokens).tolist() == [2, 4, 1]
