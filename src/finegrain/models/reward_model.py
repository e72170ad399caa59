"""Reward models at three granularities on any Hugging Face causal-LM backbone, and their save/load format.

Every model wraps a causal LM (its final hidden states come from :func:`finegrain.models.forward.hidden_states`,
through the model's own forward, so DDP and PEFT wrappers see the call) and one head from
:mod:`finegrain.models.heads`:

======================  =================================  ============================================================
class                   head                               output on a batch (prompt block ``P``, response block ``T``)
======================  =================================  ============================================================
SequenceRewardModel     ``ScalarHead`` (no bias)           ``(N,)`` score ``v`` at the last response token
                                                           (Bradley–Terry baseline, Ouyang et al. 2022)
SentenceRewardModel     ``SentenceRewardHead``             :class:`~finegrain.models.heads.SentenceRewardOutput`:
                                                           ``R = Σ_j a_j s_j`` over the sentence boundaries
                                                           (Qiu et al. 2025; docs/methods/reward-models.md)
TokenRewardModel        ``ScalarHead`` (or 3-way linear)   ``(N, T)`` ``r_φ(x, y_≤t)`` on the states after reading
                                                           each token (Xu et al., ACL 2024; docs/methods/token-rm.md)
TokenDiscriminator      ``TwoClassHead``                   ``(N, T, 2)`` logits; reward ``2·P(+) − 1``
                                                           (TLCR, Yoon et al. 2024; docs/methods/tlcr.md)
======================  =================================  ============================================================

Sentence boundaries (SRM's segmentation) come from a pluggable splitter (a
:class:`~finegrain.data.segmentation.RuleSplitter` by default, SaT optional) mapped onto tokens through
character offsets, in the ``"insert"`` mode (an added ``<END>`` token, :func:`build_reward_model`) or the
``"mark"`` mode (the last prompt and sentence tokens); both are laid out in :mod:`finegrain.data.segmentation`
and docs/methods/reward-models.md.

Saved directory (:func:`save_reward_model` / :func:`load_reward_model`)::

    DIR/config.json, DIR/model.safetensors, tokenizer files   the backbone (save_pretrained; LoRA merged)
    DIR/reward_head.safetensors                               the head's weights
    DIR/finegrain_reward.json                                 level, head config, splitter, boundary mode, ...

``RewardModel.save_pretrained`` writes the whole module as one flat safetensors file instead; the training loop's
resumable checkpoints use it (:func:`finegrain.trainers.loop.Run.save_checkpoint`).

The classes live in :mod:`finegrain.models.rm_levels`, the splitters in :mod:`finegrain.data.segmentation`; those
that callers use are re-exported here.
"""


from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.data.segmentation import PunctuationSplitter, SentenceSplitter, make_splitter, splitter_config
from finegrain.errors import ConfigError
from finegrain.models.build import hidden_size, is_peft_model, save_merged_lora
from finegrain.models.heads import ScalarHead, SentenceRewardHead, TwoClassHead
from finegrain.models.loading import REWARD_MODEL_FILE
from finegrain.models.rm_levels import (
    END_TOKEN,
    RewardModel,
    SentenceExample,
    SentenceRewardModel,
    SequenceRewardModel,
    TokenDiscriminator,
    TokenRewardModel,
    collate_sentence_examples,
)

__all__ = [
    "CONFIG_FILE",
    "LEVELS",
    "PunctuationSplitter",
    "RewardModel",
    "SentenceExample",
    "SentenceRewardModel",
    "SequenceRewardModel",
    "TokenDiscriminator",
    "TokenRewardModel",
    "build_reward_model",
    "collate_sentence_examples",
    "input_embedding_name",
    "is_reward_model_dir",
    "load_reward_model",
    "make_splitter",
    "save_reward_model",
]

_CLASSES: dict[str, type[RewardModel]] = {
    cls.level: cls for cls in (SequenceRewardModel, SentenceRewardModel, TokenRewardModel, TokenDiscriminator)
}
LEVELS: tuple[str, ...] = tuple(_CLASSES)  # sequence, sentence, token, discriminator
CONFIG_FILE = REWARD_MODEL_FILE
HEAD_FILE = "reward_head.safetensors"
FORMAT = 1


# ----------------------------------------------------------------------------------------------- build / save


def _make_head(level: str, config: dict[str, Any]) -> nn.Module:
    H = int(config["hidden_size"])
    if level in ("sequence",):  # a head config without "bias" is from before the bias-free default: it had one
        return ScalarHead(H, bias=bool(config.get("bias", True)))
    if level == "token":
        k = int(config.get("num_outputs", 1))
        if k not in (1, 3):
            raise ConfigError(f"token RM heads have 1 or 3 outputs, got {k}")
        return ScalarHead(H) if k == 1 else nn.Linear(H, 3)
    if level == "discriminator":
        return TwoClassHead(H)
    if level == "sentence":
        return SentenceRewardHead(H, int(config.get("embed_dim", 128)), rope_theta=float(config.get("rope_theta", 1e4)),
                                  max_sentences=int(config.get("max_sentences", 100)),
                                  weighted_sum=bool(config.get("weighted_sum", True)))
    raise ConfigError(f"unknown reward-model level {level!r}; choose one of {', '.join(LEVELS)}")


def _head_config(model: RewardModel) -> dict[str, Any]:
    """The head's constructor arguments (``head`` in ``finegrain_reward.json``), for :func:`_make_head`."""
    h = model.head
    if model.level == "sentence":
        return {"hidden_size": h.value.in_features, "embed_dim": h.embed_dim, "rope_theta": h.rope_theta,
                "max_sentences": h.max_sentences, "weighted_sum": h.weighted_sum}
    proj = getattr(h, "proj", h)  # the 3-way token head is a bare nn.Linear
    level_keys = {"sequence": {"bias": proj.bias is not None}, "token": {"num_outputs": proj.out_features}}
    return {"hidden_size": proj.in_features, **level_keys.get(model.level, {})}


def input_embedding_name(backbone: nn.Module) -> str:
    """The attribute name of the backbone's input embedding module (e.g. ``embed_tokens``, ``wte``)."""
    emb = backbone.get_input_embeddings()
    for name, module in backbone.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise ConfigError(f"cannot find the input embedding module of {type(backbone).__name__}")


def build_reward_model(
    level: str,
    backbone: nn.Module,
    tokenizer: Any,
    *,
    num_outputs: int = 1,
    embed_dim: int = 128,
    max_sentences: int = 100,
    weighted_sum: bool = True,
    rope_theta: float = 10000.0,
    boundary_mode: str = "insert",
    splitter: SentenceSplitter | None = None,
    end_token: str = END_TOKEN,
    double_softmax: bool = False,
    lag: int = 0,
    score_bias: bool = False,
    seed: int | None = None,
) -> RewardModel:
    """A fresh reward model of ``level`` on ``backbone`` (a new, randomly initialised head).

    For the sentence level in insert mode the ``<END>`` token is added to ``tokenizer`` (in place) and the
    embedding matrix resized to a multiple of 8 (as SRM's code does); do this **before** wrapping the backbone
    with LoRA and list the embedding in ``modules_to_save`` (:func:`input_embedding_name`) so ``<END>`` can be
    learned.

    Args:
        level: ``sequence``, ``sentence``, ``token`` or ``discriminator``.
        backbone: an ``AutoModelForCausalLM`` (optionally already PEFT-wrapped, not for insert mode).
        tokenizer: its fast tokenizer.
        num_outputs: token RM head outputs (1: scalar reward; 3: classes −1/0/+1).
        embed_dim, max_sentences, weighted_sum, rope_theta: :class:`SentenceRewardHead` settings.
        boundary_mode: ``"insert"`` or ``"mark"`` (sentence level).
        splitter: sentence splitter (default rule based).
        end_token: the boundary token text of insert mode.
        double_softmax, lag: :class:`TokenDiscriminator` compatibility flags.
        score_bias: give the sequence RM's score head a bias (the head before the bias-free default).
        seed: seed of the head's initialisation (None: the global RNG).

    Returns:
        The model; its head is float32.
    """
    if level == "sentence" and boundary_mode == "insert":
        if tokenizer.convert_tokens_to_ids(end_token) in (None, tokenizer.unk_token_id):
            tokenizer.add_tokens([end_token], special_tokens=True)
        vocab = backbone.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            backbone.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    config = {"hidden_size": hidden_size(backbone), "num_outputs": num_outputs, "embed_dim": embed_dim,
              "max_sentences": max_sentences, "weighted_sum": weighted_sum, "rope_theta": rope_theta,
              "bias": score_bias}
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        head = _make_head(level, config).float()
    return _instantiate(level, backbone, tokenizer, head, boundary_mode=boundary_mode, splitter=splitter,
                        end_token=end_token, double_softmax=double_softmax, lag=lag)


def _instantiate(level: str, backbone, tokenizer, head, **settings) -> RewardModel:
    cls = _CLASSES[level]
    return cls(backbone, tokenizer, head, **{k: settings[k] for k in cls.setting_names})


def save_reward_model(model: RewardModel, path: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` so that :func:`load_reward_model` restores it (layout in the module docstring).

    The directory is written beside its final place and renamed into it, so a reader never sees half of it. A
    LoRA backbone is saved merged (a plain causal LM).

    Args:
        model: the reward model (unwrapped).
        path: the directory (replaced if it exists).
        state_dict: the module's full state dict when it is gathered elsewhere (distributed runs); None: its own.
        extra: more entries for ``finegrain_reward.json`` (e.g. the training run's settings).

    Returns:
        ``path``.
    """
    from safetensors.torch import save_file

    from finegrain import __version__

    path = Path(path)
    if state_dict is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state_dict)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        merged = is_peft_model(model.backbone)  # saved as a plain causal LM; the trained model is left as it is
        if merged:
            save_merged_lora(model.backbone, tmp)
        else:
            model.backbone.save_pretrained(tmp, safe_serialization=True)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, str(tmp / HEAD_FILE))
        settings = {k: getattr(model, k) for k in model.setting_names}
        if "splitter" in settings:  # recorded as its config, which make_splitter reads back
            settings["splitter"] = splitter_config(model.splitter)
        info = {"format": FORMAT, "level": model.level, "head": _head_config(model), **settings,
                "peft_merged": merged, "finegrain_version": __version__, **(extra or {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_reward_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a model saved by :func:`save_reward_model`."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_reward_model(path: str | Path, *, device: str | torch.device | None = None, dtype: str | None = None,
                      trust_remote_code: bool = False, **overrides: Any) -> RewardModel:
    """Load a reward model saved by :func:`save_reward_model`, in eval mode.

    Args:
        path: the directory.
        device: where to put it (default: CPU).
        dtype: backbone dtype (``float32``, ``bfloat16``, ``float16``, ``auto``; default float32); the head stays
            float32.
        trust_remote_code: allow custom model code (off unless asked).
        **overrides: settings to change at load time: ``double_softmax``, ``lag`` (discriminator), ``splitter``
            (a splitter object, sentence level).

    Returns:
        The model (``.tokenizer`` holds its tokenizer).

    Raises:
        ConfigError: not a reward-model directory, an unknown level or format, or weights that do not match.
    """
    from safetensors.torch import load_file

    from finegrain.models.loading import load_causal_lm, load_tokenizer

    path = Path(path)
    if not is_reward_model_dir(path):
        raise ConfigError(f"{path} is not a finegrain reward model (no {CONFIG_FILE}); train one with `finegrain rm` "
                          "and pass its final/ directory")
    info = json.loads((path / CONFIG_FILE).read_text())
    if info.get("format") != FORMAT:
        raise ConfigError(f"{path}: reward-model format {info.get('format')!r} is not supported (expected {FORMAT})")
    level = info.get("level")
    if level not in _CLASSES:
        raise ConfigError(f"{path}: unknown reward-model level {level!r}")
    tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
    backbone = load_causal_lm(str(path), trust_remote_code=trust_remote_code, dtype=dtype, allow_reward_model=True)
    head = _make_head(level, info["head"]).float()
    try:
        head.load_state_dict(load_file(str(path / HEAD_FILE)))
    except (RuntimeError, FileNotFoundError) as err:
        raise ConfigError(f"{path}: the head weights do not match its {CONFIG_FILE}: {err}") from None
    unknown = set(overrides) - {"double_softmax", "lag", "splitter"}
    if unknown:
        raise ConfigError(f"load_reward_model: unknown overrides {sorted(unknown)}")
    settings = {
        "boundary_mode": info.get("boundary_mode", "insert"),
        "splitter": overrides.get("splitter") or make_splitter(info.get("splitter")),
        "end_token": info.get("end_token", END_TOKEN),
        "double_softmax": bool(overrides.get("double_softmax", info.get("double_softmax", False))),
        "lag": int(overrides.get("lag", info.get("lag", 0))),
    }
    model = _instantiate(level, backbone, tokenizer, head, **settings)
    model.eval()
    return model.to(device) if device is not None else model
