"""Test harness shared by tests/scale and tests/reliability: tiny models and data, CLI runs, run-directory readers.

* :func:`tiny_model_dir` saves a tiny random causal LM of a given architecture (Llama, Qwen2, GPT-2, Mistral) with a
  tokenizer (optionally with a chat template) so that ``--model_name_or_path DIR`` loads it like a hub model:
  word-level for Llama, GPT-2 and Mistral, byte-level BPE without BOS for Qwen2 (transformers loads the tokenizer of
  every ``qwen2`` directory as ``Qwen2Tokenizer``, which rebuilds a byte-level BPE from the saved vocabulary and
  merges, whatever the saved tokenizer was). :func:`write_sft_rows`, :func:`preference_rows` and
  :func:`prompt_rows` write rows it can learn (conversational when asked); :func:`color_reward` scores responses.
* :func:`cli` runs ``finegrain <command> ...`` as a subprocess, on 1 process or on N CPU processes through our own
  launcher (``--accelerate_config multi_gpu --num_processes N``, gloo backend).
* :data:`TRAINERS` lists the training commands; :func:`world_args` gives each the generic options that run it on
  the built-in world.

A global batch of ``batch x processes x accumulation`` examples means, per command:

* sft, po, rm: ``--per_device_train_batch_size batch --gradient_accumulation_steps accumulation`` (rows, pairs).
* ppo: ``--rollout_batch_size batch x processes x accumulation`` prompts. ppo accumulates inside each of its
  ``--num_mini_batches`` (:data:`PPO_MINI_BATCHES`) minibatches, so its micro-batch is
  ``--per_device_train_batch_size batch / PPO_MINI_BATCHES`` rows, and ``--generation_batch_size``
  (:data:`PPO_GENERATION_BATCH`) fixes the sampling groups so that any process count samples the same responses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PYTHON = sys.executable
TRAINERS = ("sft", "po", "rm", "ppo")

PPO_MINI_BATCHES = 2  # optimizer steps per rollout batch and ppo epoch
PPO_GENERATION_BATCH = 4  # prompts per sampling group; divides every process's share of the rollouts used here

# per-command options that keep a world run to seconds
FAST_OPTIONS: dict[str, list[str]] = {
    "sft": [],
    "po": [],
    "rm": [],
    "ppo": ["--ppo_epochs", "2", "--num_mini_batches", str(PPO_MINI_BATCHES), "--max_new_tokens", "24"],
}
# the metric each command's loss is logged as
LOSS_KEY = {"ppo": "policy/loss"}

WORDS = ["what", "color", "is", "the", "sky", "grass", "sun", "snow", "sea", "blue", "green", "yellow", "white",
         "it", "a", "and", "very", "bright", "today", "?", ".", "user", "assistant", "say", "tell", "me"]
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% if m['role'] == 'assistant' %} [EOS]{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FACTS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "sea": "blue"}


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run the in-process tiny models on one torch thread: far faster than two oversubscribed ones on a shared
    2-core machine (launched runs get OMP_NUM_THREADS=1 from :func:`cli_env`). Autouse in the modules that import it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def word_tokenizer(chat_template: str | None = None):
    """A word-level fast tokenizer over :data:`WORDS` (BOS prepended, EOS/PAD/UNK), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                  unk_token="[UNK]", additional_special_tokens=["<|user|>", "<|assistant|>"])
    out.chat_template = chat_template
    return out


def byte_level_tokenizer(chat_template: str | None = None):
    """A byte-level BPE tokenizer (Qwen2's pre-tokenizer) whose merges make every word of :data:`WORDS` one token
    (``Ġword`` after a space); no BOS is added, as with Qwen2's own tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 2 + WORDS + [" " + w for w in WORDS]
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]",
                                  additional_special_tokens=["[BOS]", "<|user|>", "<|assistant|>"])
    out.chat_template = chat_template
    return out


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4):
    """A transformers config of ``arch`` (llama, qwen2, gpt2, mistral) small enough to train in seconds on CPU."""
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=128, **ids)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=128,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    raise ValueError(arch)


ARCHITECTURES = ("llama", "qwen2", "gpt2", "mistral")


def tiny_model_dir(path: Path, arch: str = "llama", *, chat: bool = False, seed: int = 0) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer under ``path`` (loadable with from_pretrained)."""
    from finegrain.models.build import causal_lm_from_config

    make = byte_level_tokenizer if arch == "qwen2" else word_tokenizer
    tok = make(CHAT_TEMPLATE if chat else None)
    model = causal_lm_from_config(tiny_config(arch, len(tok)), seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def sft_rows(n: int, *, chat: bool = False) -> list[dict]:
    """``n`` rows: "what color is the X ?" -> "the X is C ." (conversational ``messages`` when ``chat``)."""
    things = sorted(FACTS)
    rows = []
    for i in range(n):
        x = things[i % len(things)]
        extra = " very" if (i // len(things)) % 2 else ""
        prompt, completion = f"what color is the {x} ?", f"the {x} is{extra} {FACTS[x]} ."
        if chat:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def write_sft_rows(path: Path, n: int = 64, *, chat: bool = False) -> Path:
    return write_rows(path, sft_rows(n, chat=chat))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wrong_color(thing: str, i: int) -> str:
    colors = sorted(set(FACTS.values()) - {FACTS[thing]})
    return colors[i % len(colors)]


def preference_rows(n: int, *, chat: bool = False) -> list[dict]:
    """``n`` pairs: "what color is the X ?" -> chosen "the X is C .", rejected "W X ?" with a wrong colour W: easy to
    tell apart, so a tiny random model learns them in a few steps (conversational messages when ``chat``)."""
    things = sorted(FACTS)
    rows = []
    for i in range(n):
        x = things[i % len(things)]
        prompt, chosen, rejected = (f"what color is the {x} ?", f"the {x} is {FACTS[x]} .",
                                     f"{_wrong_color(x, i)} {x} ?")
        if chat:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int, *, chat: bool = False) -> list[dict]:
    """``n`` prompts "what color is the X ?" (conversational when ``chat``) for RL."""
    rows = [{"prompt": r["prompt"]} for r in preference_rows(n, chat=chat)]
    return rows


def brevity_reward(prompts: list, responses: list[str]) -> list[float]:  # noqa: ARG001
    """A rule reward (``--reward python:_runs:brevity_reward``): minus the response's length in characters / 40.

    A tiny random model improves on it within a few PPO steps whatever its tokenizer, by ending responses sooner."""
    return [-len(r) / 40 for r in responses]


# ----------------------------------------------------------------------------------------------- CLI runs


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("FINEGRAIN_DEBUG", None)
    env.update(extra)
    return env


def cli_command(command: str, args: list[str], processes: int = 1) -> list[str]:
    launch = ["--accelerate_config", "multi_gpu", "--num_processes", str(processes)] if processes > 1 else []
    return [PYTHON, "-m", "finegrain.cli.main", command, *args, *launch]


def cli(command: str, args: list[str], processes: int = 1, timeout: float = 300, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``finegrain <command> args`` to the end; on failure (with ``check``) raise with its output."""
    proc = subprocess.run(cli_command(command, args, processes), capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"finegrain {command} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def start(command: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``finegrain <command> args`` (one process) without waiting."""
    return subprocess.Popen(cli_command(command, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or cli_env())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240, what: str = "") -> None:
    """Poll ``predicate()`` until true; fail if ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}\n{err[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 120) -> tuple[int, str]:
    """Send ``sig`` and wait; returns (exit status, stderr)."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def batch_args(command: str, batch: int, accumulation: int = 1, processes: int = 1) -> list[str]:
    """The options that make a global batch of ``batch x processes x accumulation`` examples (module docstring)."""
    if command == "ppo":
        assert batch % PPO_MINI_BATCHES == 0, "ppo: the per-process batch must split into the minibatches"
        return ["--rollout_batch_size", str(batch * processes * accumulation), "--generation_batch_size",
                str(PPO_GENERATION_BATCH), "--per_device_train_batch_size", str(batch // PPO_MINI_BATCHES)]
    return ["--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation)]


def world_args(command: str, world: Path, out: Path, *, steps: int, batch: int, accumulation: int = 1,
               processes: int = 1, lr: float = 1e-3, seed: int = 0, extra: list[str] = ()) -> list[str]:
    """Options that run ``command`` on the built-in world at ``world`` for a few steps, logging every step."""
    return ["--world_dir", str(world), "--output_dir", str(out), "--max_steps", str(steps),
            *batch_args(command, batch, accumulation, processes),
            "--learning_rate", str(lr), "--seed", str(seed), "--logging_steps", "1", "--disable_tqdm",
            "--max_train_samples", "256", "--max_eval_samples", "8", "--record_consumed",
            *FAST_OPTIONS.get(command, []), *extra]


def model_args(model_dir: Path, data: Path, out: Path, *, steps: int, batch: int, accumulation: int = 1,
               lr: float = 1e-3, seed: int = 0, extra: list[str] = ()) -> list[str]:
    """Options that run a command on a tiny model directory and a data file."""
    return ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation), "--learning_rate", str(lr), "--seed", str(seed),
            "--logging_steps", "1", "--disable_tqdm", "--max_length", "64", "--max_prompt_length", "32",
            "--record_consumed", *extra]


# ----------------------------------------------------------------------------------------------- run readers


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step (the metric named by :data:`LOSS_KEY` for the run's command)."""
    command = json.loads((Path(run_dir) / "run.json").read_text())["command"]
    return [r[LOSS_KEY.get(command, "loss")] for r in metrics(run_dir)]


def logged(run_dir: Path, split: str = "train") -> list[dict]:
    """Every logged metric row of ``split`` without the wall-clock figures (``time/*``, ``perf/*``), which differ by run."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in metrics(run_dir, split)]


def consumed(run_dir: Path) -> list[list[int]]:
    """Example indices of every optimizer step, in step order (``--record_consumed``); asserts steps are 1..n."""
    rows = [json.loads(x) for x in (Path(run_dir) / "consumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "consumed.jsonl steps are not 1..n"
    return [r["indices"] for r in rows]


def weights(directory: Path, pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file directly in ``directory`` (a model folder) whose name matches."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob(pattern)):
        out.update(load_file(f))
    assert out, f"no safetensors in {directory}"
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def relative_update_error(w0: dict, w1: dict, w2: dict) -> float:
    """``‖w2 − w1‖ / ‖w1 − w0‖`` over all tensors: how far run 2 lands from run 1, relative to run 1's update."""
    num = sum(((w2[k].double() - w1[k].double()) ** 2).sum() for k in w1)
    den = sum(((w1[k].double() - w0[k].double()) ** 2).sum() for k in w1)
    return float((num / den).sqrt())


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
