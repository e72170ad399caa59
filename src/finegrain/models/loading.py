"""The one place that reads models and tokenizers from disk or the hub.

``trust_remote_code`` is off unless the caller asks; weights are read as safetensors where the checkpoint
has them. Errors name the path and say what to check. A path ending in ``.gguf`` is converted once into a plain
model directory in the cache (:mod:`finegrain.models.gguf`) and loaded from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finegrain.errors import ConfigError
from finegrain.models.build import torch_dtype
from finegrain.models.gguf import ensure_converted


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer (a run directory: its ``final/``'s); give it a pad token (its EOS) when it has none, as
    causal-LM training needs one."""
    from transformers import AutoTokenizer

    name_or_path = ensure_converted(name_or_path)  # issue 13: a .gguf file loads from its converted directory
    name_or_path = model_dir(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load a tokenizer from {name_or_path!r}: {exc}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"tokenizer {name_or_path!r} has neither a pad nor an EOS token; set one and save it")
        tok.pad_token = tok.eos_token
    return tok


REWARD_MODEL_FILE = "finegrain_reward.json"
"""The file that marks a directory saved by ``finegrain rm`` (:mod:`finegrain.models.reward_model`)."""


def model_dir(path: str | Path) -> str:
    """A model directory from a run directory: ``RUN`` -> ``RUN/final`` when RUN holds no model of its own."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        return str(p / "final")
    return str(path)


def refuse_reward_model(path: str | Path, role: str = "--model_name_or_path") -> None:
    """Raise :class:`ConfigError` when ``path`` (or its ``final/``) is a reward model saved by ``finegrain rm``.

    A reward model's directory also holds a causal LM (its backbone), so it would load as a policy without a word
    and train or sample from the wrong weights.
    """
    for candidate in (Path(path), Path(path) / "final"):
        marker = candidate / REWARD_MODEL_FILE
        if marker.is_file():
            raise ConfigError(
                f"{role} {path} is a reward model ({marker} gives it away), not a language model to train or sample; "
                "reward models go to `finegrain ppo --reward`, `finegrain eval --judge` or `--token_credit`"
            )


def load_causal_lm(name_or_path: str, *, trust_remote_code: bool = False, dtype: str | None = None,
                   allow_reward_model: bool = False):
    """Load an ``AutoModelForCausalLM`` (float32 by default on CPU).

    A run directory loads its ``final/`` model. A reward-model directory is refused (by
    :func:`refuse_reward_model`) unless ``allow_reward_model`` (the reward-model loader reading its backbone).
    """
    from transformers import AutoModelForCausalLM

    name_or_path = ensure_converted(name_or_path)  # issue 13: a .gguf file loads from its converted directory
    if not allow_reward_model:
        refuse_reward_model(name_or_path)
    name_or_path = model_dir(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype if dtype == "auto" else torch_dtype(dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        hint = "" if Path(name_or_path).exists() else " (no such local path; hub ids need network access)"
        raise ConfigError(f"could not load a causal LM from {name_or_path!r}{hint}: {exc}") from None


def save_pretrained(model, tokenizer, path: str | Path) -> Path:
    """Save a model (safetensors) and its tokenizer so that ``from_pretrained(path)`` loads them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``name`` as a device; None: ``cuda`` when available, else ``cpu``."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None


class ModelCache:
    """Loads each model and tokenizer directory once, on one device, in eval mode (nothing trains here).

    Args:
        device: where models go.
        dtype: ``float32`` / ``bfloat16`` / ``float16`` or None (float32).
        trust_remote_code: allow custom model code.
    """

    def __init__(self, device: torch.device, dtype: str | None = None, trust_remote_code: bool = False):
        self.device, self.dtype, self.trust_remote_code = device, dtype, trust_remote_code
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        self.reference_samples: dict[tuple, Any] = {}  # evaluate_policy's reference side, by settings

    @staticmethod
    def _key(path: str | Path) -> str:
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else str(path)

    def model(self, path: str | Path):
        """The causal LM at ``path`` (loaded on first use)."""
        key = self._key(path)
        if key not in self._models:
            model = load_causal_lm(str(path), trust_remote_code=self.trust_remote_code, dtype=self.dtype)
            self._models[key] = model.to(self.device).eval()
        return self._models[key]

    def tokenizer(self, path: str | Path):
        """The tokenizer at ``path`` (loaded on first use)."""
        key = self._key(path)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(str(path), trust_remote_code=self.trust_remote_code)
        return self._tokenizers[key]
