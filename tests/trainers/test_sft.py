import json

import pytest

from finegrain.cli.commands import command_config
from finegrain.trainers.sft import SFTConfig, load_inputs, train

pytestmark = pytest.mark.smoke


def _losses(run_dir, split="train"):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def test_sft_loss_falls_on_world_text(tiny_world, tmp_path):
    cfg = command_config("sft", SFTConfig, ["--world_dir", str(tiny_world), "--output_dir", str(tmp_path / "run"), "--max_steps", "30",
                            "--learning_rate", "3e-3", "--per_device_train_batch_size", "32", "--logging_steps", "1",
                            "--disable_tqdm", "--save_steps", "15"], "finegrain sft")
    model, tok, data, _ = load_inputs(cfg)
    run = train(cfg, model, tok, data)
    losses = _losses(run)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # from scratch: the loss falls fast
    assert (run / "final" / "model.safetensors").is_file()
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000030", "step-000015"] or \
        sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000015", "step-000030"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "final")  # loads as a plain HF model


def test_sft_refuses_to_clobber_a_run_without_resume(tiny_world, tmp_path):
    from finegrain.errors import ConfigError

    args = ["--world_dir", str(tiny_world), "--output_dir", str(tmp_path / "run"), "--max_steps", "2",
            "--per_device_train_batch_size", "8", "--save_steps", "1", "--disable_tqdm"]
    cfg = command_config("sft", SFTConfig, args)
    model, tok, data, _ = load_inputs(cfg)
    train(cfg, model, tok, data)
    with pytest.raises(ConfigError, match="resume_from_checkpoint latest"):
        train(cfg, model, tok, data)
