"""Any Hugging Face causal LM: tiny random Llama, Qwen2, GPT-2 and Mistral models through every trainer's CLI path.

Each model is saved to a directory with its tokenizer (word-level, or byte-level BPE for Qwen2; with a chat template
for the conversational rows, used with Qwen2 and Mistral) and loaded like a hub model (``--model_name_or_path``,
``trust_remote_code`` off). Every training command runs on every architecture:

* sft on prompt/completion rows, po (DPO) and rm (sequence level, Bradley–Terry) on preference pairs: the loss of the
  last step is below the first's;
* ppo on prompts with a rule reward (:func:`_runs.brevity_reward`): the mean reward of the last 3 rollout batches
  beats the first 3 by 0.05 at least (measured: 0.1 for Qwen2's byte-level BPE, 0.8 or more for the others).

The run must write ``final/`` that ``AutoModelForCausalLM.from_pretrained`` loads into the same architecture with the
trained weights (rm: the backbone, and the reward head with it through ``load_reward_model``), and tokenise
conversational rows through the tokenizer's chat template. LoRA (``--use_peft``) saves the merged model in ``final/``
and the adapter in ``final/adapter/``; both load and agree with each other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runs as R  # noqa: E402
from _runs import one_torch_thread  # noqa: E402,F401 (autouse fixture)

from finegrain.cli import commands  # noqa: E402

pytestmark = pytest.mark.smoke


def _sft(model_dir: Path, tmp: Path, out: Path, chat: bool, extra=()) -> Path:

    data = R.write_sft_rows(tmp / ("chat.jsonl" if chat else "rows.jsonl"), 32, chat=chat)
    commands.sft(R.model_args(model_dir, data, out, steps=6, batch=8, lr=3e-3, extra=list(extra)))
    return out


def _po(model_dir: Path, tmp: Path, out: Path, chat: bool, extra=()) -> Path:

    data = R.write_rows(tmp / "pairs.jsonl", R.preference_rows(32, chat=chat))
    commands.po(R.model_args(model_dir, data, out, steps=8, batch=8, lr=1e-2, extra=list(extra)))
    return out


def _rm(model_dir: Path, tmp: Path, out: Path, chat: bool, extra=()) -> Path:

    data = R.write_rows(tmp / "pairs.jsonl", R.preference_rows(32, chat=chat))
    commands.rm(R.model_args(model_dir, data, out, steps=8, batch=8, lr=1e-2, extra=list(extra)))
    return out


def _ppo(model_dir: Path, tmp: Path, out: Path, chat: bool, extra=()) -> Path:

    data = R.write_rows(tmp / "prompts.jsonl", R.prompt_rows(40, chat=chat))
    commands.ppo(R.model_args(model_dir, data, out, steps=12, batch=8, lr=3e-2, extra=[
        "--rollout_batch_size", "16", "--ppo_epochs", "2", "--max_new_tokens", "12", "--kl_coef", "0",
        "--reward", "python:_runs:brevity_reward", *extra]))
    return out


RUNNERS = {"sft": _sft, "po": _po, "rm": _rm, "ppo": _ppo}  # command -> runner(model_dir, tmp, out, chat, extra)


def _assert_learned(command: str, run: Path) -> None:
    losses = R.losses(run)
    assert len(losses) > 0 and all(torch.isfinite(torch.tensor(losses)))
    if command == "ppo":
        reward = [r["rewards/raw"] for r in R.metrics(run)]
        assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.05, reward
    else:
        assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("arch", R.ARCHITECTURES)
@pytest.mark.parametrize("command", R.TRAINERS)
def test_trains_and_saves_a_loadable_model(command, arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = R.tiny_model_dir(tmp_path / "model", arch, chat=True)
    run = RUNNERS[command](model_dir, tmp_path, tmp_path / "run", chat=(arch in ("qwen2", "mistral")))
    _assert_learned(command, run)
    final = run / "final"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert AutoConfig.from_pretrained(final).model_type == AutoConfig.from_pretrained(model_dir).model_type
    trained = R.weights(final, "model*.safetensors")  # rm: the backbone; its head is reward_head.safetensors
    assert R.max_abs_diff(trained, R.weights(model_dir)) > 0  # the saved weights are the trained ones
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert "trust_remote_code: false" in (run / "config.yaml").read_text()  # off unless asked
    if command == "rm":
        from finegrain.models.reward_model import load_reward_model

        reward_model = load_reward_model(final).state_dict()
        head = R.weights(final, "reward_head.safetensors")
        assert all(torch.equal(reward_model[f"backbone.{k}"], v) for k, v in trained.items() if k != "lm_head.weight")
        assert head and all(torch.equal(reward_model[f"head.{k}"], v) for k, v in head.items())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # word-level with BOS; byte-level BPE without
def test_conversational_rows_go_through_the_chat_template(arch, tmp_path):
    from finegrain.data.prepared import CompletionData
    from finegrain.data.tokenize import TokenLimits
    from finegrain.models.loading import load_tokenizer

    model_dir = R.tiny_model_dir(tmp_path / "model", arch, chat=True)
    tok = load_tokenizer(str(model_dir))
    data = R.write_sft_rows(tmp_path / "chat.jsonl", 8, chat=True)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    prepared = CompletionData.from_source(str(data), tok, split="train", kind=None,
                                          limits=TokenLimits(max_length=64, max_prompt_length=32))
    for i, row in enumerate(rows):
        expected = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_dict=False)
        assert prepared[i]["prompt_input_ids"] == list(expected)
        assert tok.convert_ids_to_tokens(prepared[i]["prompt_input_ids"])[-1] == "<|assistant|>"
        assert tok.decode(prepared[i]["completion_input_ids"], skip_special_tokens=True).split() == \
            row["messages"][1]["content"].split()
        assert prepared[i]["completion_input_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: LoRA on Conv1D (fan_in_fan_out) layers
def test_lora_saves_merged_model_and_adapter(arch, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = R.tiny_model_dir(tmp_path / "model", arch)
    run = _sft(model_dir, tmp_path, tmp_path / "run", chat=False,
               extra=["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2"])
    final = run / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final / "adapter").eval()
    x = torch.tensor([[1, 6, 7, 8, 9, 10, 25]])
    with torch.no_grad():
        a, b, c = merged(x).logits, with_adapter(x).logits, base(x).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # merged == base + adapter
    assert (a - c).abs().max() > 1e-4  # and the adapter changed the model


def test_lora_run_resumes_from_its_adapter_checkpoint(tmp_path):
    model_dir = R.tiny_model_dir(tmp_path / "model", "llama")
    # a constant schedule, so that a 3-step run's first steps are the 6-step run's first steps
    lora = ["--use_peft", "--lora_r", "4", "--save_steps", "3", "--lr_scheduler_type", "constant"]
    ref = _sft(model_dir, tmp_path, tmp_path / "ref", chat=False, extra=lora)

    data = tmp_path / "rows.jsonl"
    out = tmp_path / "run"
    commands.sft(R.model_args(model_dir, data, out, steps=3, batch=8, lr=3e-3, extra=lora))  # a shorter run...
    (out / "final").rename(tmp_path / "unused")
    # ...continued to 6 steps from its step-3 checkpoint gives the uninterrupted 6-step run's adapter
    commands.sft(R.model_args(model_dir, data, out, steps=6, batch=8, lr=3e-3,
                          extra=[*lora, "--resume_from_checkpoint", str(out / "checkpoints" / "step-000003")]))
    assert R.consumed(out) == R.consumed(ref)
    assert R.bitwise_equal(R.weights(out / "final" / "adapter"), R.weights(ref / "final" / "adapter"))
    assert R.bitwise_equal(R.weights(out / "final"), R.weights(ref / "final"))
