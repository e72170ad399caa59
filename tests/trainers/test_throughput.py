"""Throughput in the training logs: tokens per second and MFU checked against a hand count of the work done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scale"))
import _runs as R  # noqa: E402
from _runs import one_torch_thread  # noqa: E402,F401 (autouse fixture)

from finegrain.models.flops import ModelFlops  # noqa: E402
from finegrain.trainers.throughput import Throughput, decode_flops  # noqa: E402


def test_the_meter_reports_per_window_and_in_total():
    meter = Throughput()
    meter._peak = (100.0, "a test peak")
    meter.add(2.0, 10, 50.0)
    meter.add(2.0, 30, 150.0)
    assert meter.report() == {"perf/step_time": 2.0, "perf/tokens_per_second": 10.0, "perf/mfu": 0.5}
    meter.add(1.0, 5, 10.0, phase="rollout")
    assert meter.report() == {"perf/rollout_step_time": 1.0, "perf/rollout_tokens_per_second": 5.0,
                              "perf/rollout_mfu": 0.1}
    assert meter.report() == {}  # a new window
    assert meter.totals()["perf/tokens_per_second"] == 10.0 and meter.totals()["perf/rollout_mfu"] == 0.1


def test_decode_flops_by_hand():
    """N_body 10, N_head 5, L 1, d 2: prefill of P=3 with the head at 1 position = 2*10*3 + 2*5*1 + 4*1*2*9 = 142;
    then tokens at contexts 4 and 5: (2*15 + 8*4) + (2*15 + 8*5) = 62 + 70."""
    mf = ModelFlops(body_params=10, head_params=5, layers=1, attn_width=2)
    assert decode_flops(mf, 3, 3) == 142 + 62 + 70
    assert decode_flops(mf, 3, 0) == 0.0


@pytest.mark.smoke
def test_sft_logs_tokens_per_second_and_mfu_that_match_a_hand_count(tmp_path):
    """A tiny Llama (hidden 32, 2 layers, 4 heads of 8, 2 KV heads, MLP 64, tied head of the vocabulary): its matmul
    weights are per layer q 32x32, k and v 32x16, o 32x32, gate and up 32x64, down 64x32; the head is V x 32. A row
    of n tokens whose completion has h costs 3 (2 N_body n + 2 N_head h + 4 L d n^2) to train (d = 32)."""
    from finegrain.cli.main import main as cli_main
    from finegrain.models.loading import load_tokenizer

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    rows = R.sft_rows(8)
    data = R.write_rows(tmp_path / "sft.jsonl", rows)
    out = tmp_path / "run"
    assert cli_main(["sft", *R.model_args(model, data, out, steps=2, batch=4)]) == 0
    tok = load_tokenizer(str(model))
    body = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 32 * 64 + 32 * 64 + 64 * 32)
    head = len(tok) * 32
    logged = R.metrics(out)
    consumed = R.consumed(out)
    peak = json.loads((out / "run.json").read_text())["perf_peak"]
    assert "measured" in peak["source"] and peak["flops"] > 0
    for row, indices in zip(logged, consumed):
        tokens = flops = 0
        for i in indices:
            p = len(tok(rows[i]["prompt"])["input_ids"])  # BOS + the prompt's words
            h = len(tok(rows[i]["completion"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
            n = p + h
            tokens += n
            flops += 3 * (2 * body * n + 2 * head * h + 4 * 2 * 32 * n * n)
        seconds = row["perf/step_time"]
        assert row["perf/tokens_per_second"] * seconds == pytest.approx(tokens)
        assert row["perf/mfu"] * seconds * peak["flops"] == pytest.approx(flops)
    summary = json.loads((out / "run.json").read_text())["perf"]
    assert summary["perf/tokens_per_second"] > 0 and 0 < summary["perf/mfu"] < 1


@pytest.mark.parametrize("extra, reference_reads", [([], True), (["--precompute_ref_log_probs"], False)],
                         ids=["live reference", "cached reference"])
def test_po_logs_tokens_per_second_and_mfu_that_match_a_hand_count(tmp_path, extra, reference_reads):
    """DPO on the tiny Llama of the sft test: a pair is two rows (the prompt with each response); each trains at
    3 F(n, h), and a live reference (a frozen copy) adds its forward F(n, h); cached reference log-probs do not."""
    from finegrain.cli.main import main as cli_main
    from finegrain.models.loading import load_tokenizer

    model = R.tiny_model_dir(tmp_path / "model", "llama")
    rows = R.preference_rows(8)
    data = R.write_rows(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert cli_main(["po", "--loss", "dpo", *R.model_args(model, data, out, steps=2, batch=4, extra=extra)]) == 0
    tok = load_tokenizer(str(model))
    body = 2 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 32 * 64 + 32 * 64 + 64 * 32)
    head = len(tok) * 32
    peak = json.loads((out / "run.json").read_text())["perf_peak"]["flops"]
    per_row = 4 if reference_reads else 3
    for row, indices in zip(R.metrics(out), R.consumed(out)):
        tokens = flops = 0
        for i in indices:
            p = len(tok(rows[i]["prompt"])["input_ids"])
            for side in ("chosen", "rejected"):
                h = len(tok(rows[i][side], add_special_tokens=False)["input_ids"]) + 1  # + EOS
                n = p + h
                tokens += n
                flops += per_row * (2 * body * n + 2 * head * h + 4 * 2 * 32 * n * n)
        seconds = row["perf/step_time"]
        assert row["perf/tokens_per_second"] * seconds == pytest.approx(tokens)
        assert row["perf/mfu"] * seconds * peak == pytest.approx(flops)
    summary = json.loads((out / "run.json").read_text())["perf"]
    assert summary["perf/tokens_per_second"] > 0 and 0 < summary["perf/mfu"] < 1
