"""finegrain rm: smoke training of every level on the tiny world (the loss falls, files written, the saved model
reloads with identical rewards), resume, RewardBench-style subsets, token rows from `finegrain label edits`."""

import json

import pytest
import torch

from finegrain.cli.commands import command_config
from finegrain.config import parse
from finegrain.errors import ConfigError
from finegrain.models.reward_model import load_reward_model
from finegrain.rewards.models import make_reward_source
from finegrain.trainers.rm import RMConfig, collate_pairs, load_inputs, train

pytestmark = pytest.mark.smoke


def _metrics(run_dir, split):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def _cfg(tiny_world, tmp_path, level, *extra):
    args = ["--level", level, "--world_dir", str(tiny_world), "--output_dir", str(tmp_path / level),
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "16", "--logging_steps", "1",
            "--max_eval_samples", "48", "--max_credit_samples", "48", "--disable_tqdm", "--seed", "1",
            "--lr_scheduler_type", "constant", "--reward_embed_dim", "16", *extra]
    return command_config("rm", RMConfig, args)


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.parametrize("level", ["sequence", "sentence", "token", "discriminator"])
def test_every_level_trains_saves_and_reloads(level, tiny_world, tmp_path):
    cfg = _cfg(tiny_world, tmp_path, level, "--max_steps", "24", "--eval_steps", "12")
    data = load_inputs(cfg)
    run = train(cfg, data)
    train_rows, eval_rows = _metrics(run, "train"), _metrics(run, "eval")
    assert len(train_rows) == 24 and len(eval_rows) == 2
    losses = [r["loss"] for r in train_rows]
    assert _mean(losses[-6:]) < _mean(losses[:6])  # it learns
    last = eval_rows[-1]
    assert 0.0 <= last["accuracy"] <= 1.0 and "margin" in last
    if level != "sequence":
        assert 0.0 <= last["auroc"] <= 1.0  # token credit against the world's ground truth
    if level in ("token", "discriminator"):
        assert last["edit_auroc"] > 0.5 and 0.0 <= last["edit_accuracy"] <= 1.0
    assert json.loads((run / "run.json").read_text())["status"] == "completed"

    # the saved model reloads and gives the trained model's rewards exactly
    loaded = load_reward_model(run / "final")
    assert loaded.level == level
    batch = collate_pairs(data.model, data.eval_pairs[:4], data.tokenizer.pad_token_id)
    data.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(batch), data.model.score(batch), atol=0, rtol=0)
    if level != "sentence":  # the same rewards through the reward-source interface
        plain = collate_pairs(loaded, data.eval_pairs[:4], loaded.tokenizer.pad_token_id)
        want = make_reward_source(data.model, data.tokenizer).token_rewards(plain).values
        got = make_reward_source(loaded, loaded.tokenizer).token_rewards(plain).values
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_resume_continues_to_the_same_weights(tiny_world, tmp_path):
    common = ["--save_steps", "3"]
    straight = _cfg(tiny_world, tmp_path / "a", "sequence", "--max_steps", "6", *common)
    train(straight, load_inputs(straight))
    first = _cfg(tiny_world, tmp_path / "b", "sequence", "--max_steps", "3", *common)
    train(first, load_inputs(first))
    again = _cfg(tiny_world, tmp_path / "b", "sequence", "--max_steps", "6", "--resume_from_checkpoint", "latest",
                 *common)
    train(again, load_inputs(again))
    a = load_reward_model(tmp_path / "a" / "sequence" / "final")
    b = load_reward_model(tmp_path / "b" / "sequence" / "final")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=name)


def test_subsets_are_reported_and_token_rows_train_the_discriminator(tiny_world, tmp_path):
    from finegrain.cli.commands import label as label_main

    pairs = [json.loads(line) for line in (tiny_world / "data" / "pairs_test.jsonl").read_text().splitlines()]
    pairs = [p for p in pairs if p["chosen"].strip() and p["rejected"].strip()][:40]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"],
                                         "subset": "chat" if i % 2 else "safety"}) + "\n"
                             for i, p in enumerate(pairs)))
    edits = tmp_path / "edits.jsonl"
    assert label_main(["edits", "--world_dir", str(tiny_world), "--output_file", str(edits)]) == 0
    sft = str(tiny_world / "sft")
    cfg = _cfg(tiny_world, tmp_path, "discriminator", "--max_steps", "4", "--model_name_or_path", sft,
               "--dataset_name", str(edits), "--eval_dataset_name", str(bench), "--eval_split", "train")
    data = load_inputs(cfg)
    assert data.kind == "tokens" and data.credit is None and data.eval_revisions is None
    run = train(cfg, data)
    last = _metrics(run, "eval")[-1]
    assert {"accuracy/chat", "accuracy/safety"} <= set(last)
    # 20 rows in each subset: the overall accuracy is their mean
    assert _mean([last["accuracy/chat"], last["accuracy/safety"]]) == pytest.approx(last["accuracy"], abs=1e-9)
    # objective A pairs each rejected response with its revision: token rows cannot feed it
    bad = _cfg(tiny_world, tmp_path, "token", "--max_steps", "2", "--model_name_or_path", sft,
               "--dataset_name", str(edits))
    with pytest.raises(ConfigError, match="token_cls"):
        load_inputs(bad)


def test_config_errors():
    with pytest.raises(ConfigError, match="reward_embed_dim"):
        parse(RMConfig, ["--reward_embed_dim", "7"], "finegrain rm")
    with pytest.raises(ConfigError, match="level"):
        parse(RMConfig, ["--level", "paragraph"], "finegrain rm")


def test_lora_sentence_rm_with_inserted_tokens_checkpoints_resumes_and_saves_merged(tiny_world, tmp_path):
    """LoRA backbone + <END> insertion: the embedding trains too (modules_to_save), the flat checkpoint holds every
    tensor of the PEFT model, resume restores it, and final/ is a plain (merged) model."""
    args = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "2"]
    first = _cfg(tiny_world, tmp_path, "sentence", "--max_steps", "2", *args)
    data = load_inputs(first)
    trainable = [n for n, p in data.model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("modules_to_save" in n for n in trainable)
    assert any(n.startswith("head.") for n in trainable)
    train(first, data)
    again = _cfg(tiny_world, tmp_path, "sentence", "--max_steps", "3", "--resume_from_checkpoint", "latest", *args)
    data = load_inputs(again)
    run = train(again, data)
    assert [r["step"] for r in _metrics(run, "train")] == [1, 2, 3]
    info = json.loads((run / "final" / "finegrain_reward.json").read_text())
    assert info["peft_merged"] is True and info["boundary_mode"] == "insert"
    loaded = load_reward_model(run / "final")
    batch = collate_pairs(data.model, data.eval_pairs[:4], data.tokenizer.pad_token_id)
    data.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(batch), data.model.score(batch), atol=1e-5, rtol=1e-5)
