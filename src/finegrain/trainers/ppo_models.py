"""The models of a ``finegrain ppo`` run: the reference, the critic (a value head on a separate body or on the
policy's own states), their optimizers and schedulers, and the views that checkpoints save of them.

Split from :mod:`finegrain.trainers.ppo` (the loop) to keep each file one job; docs/methods/ppo.md describes the
options (``--critic``, ``--use_peft``, ``--critic_learning_rate``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from finegrain.errors import ConfigError
from finegrain.models.build import apply_lora, disable_dropout, freeze, hidden_size
from finegrain.models.forward import decoder, hidden_states, model_inputs, predicting_states
from finegrain.models.heads import ScalarHead
from finegrain.rl.rollout import take_rows
from finegrain.trainers import loop
from finegrain.types import CompletionBatch

if TYPE_CHECKING:
    from finegrain.trainers.ppo_config import PPOConfig

__all__ = ["Models", "ValueModel", "critic_values", "make_critic", "make_reference", "rollout_values",
           "setup_models"]


class ValueModel(nn.Module):
    """The separate critic: ``V(s_i) = w·h_i + b`` on a transformer body's final hidden states.

    Args:
        body: a transformer body without LM head (e.g. ``policy.get_decoder()``), optionally LoRA-wrapped.
        hidden_size: ``H``.

    Shapes: ``forward(input_ids (N, L), attention_mask (N, L), position_ids (N, L)) -> (N, L)``. The head starts
    at zero, so the first advantages are the returns themselves.
    """

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.head = _zero_head(hidden_size)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, return_dict=True)
        return self.head(out.last_hidden_state)


class _CheckpointView(nn.Module):
    """What a checkpoint stores of the critic (or the shared value head): all of its state, or only its
    trainable parameters (a LoRA critic: the adapter and the head).

    ``Run.save_checkpoint`` saves ``state_dict()`` through ``save_pretrained`` and ``Run.resume``
    matches keys with ``state_dict()`` before ``load_state_dict``; the critic is no Hugging Face model, so this
    view provides the three methods (safetensors, one file).
    """

    def __init__(self, module: nn.Module, trainable_only: bool):
        super().__init__()
        self.inner = module
        self.trainable_only = trainable_only

    def state_dict(self, *args, **kwargs):  # noqa: ARG002
        if self.trainable_only:
            return {k: p.detach() for k, p in self.inner.named_parameters() if p.requires_grad}
        return self.inner.state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: ARG002
        return self.inner.load_state_dict(state_dict, strict=not self.trainable_only and strict)

    def save_pretrained(self, path, state_dict=None, safe_serialization: bool = True):  # noqa: ARG002
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path / "model.safetensors"))


class _Bundle:
    """Several optimizers (or schedulers) saved and restored as one, for ``Run.save_checkpoint``."""

    def __init__(self, **parts):
        self.parts = {k: v for k, v in parts.items() if v is not None}

    def state_dict(self) -> dict:
        return {k: v.state_dict() for k, v in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.parts.items():
            v.load_state_dict(state[k])


def make_reference(cfg: PPOConfig, policy: nn.Module):
    """``(ref_model, ref_context)`` for :func:`finegrain.rl.rollout.score_rollout`.

    With LoRA the reference is the policy with its adapter disabled: ``(None, policy.disable_adapter)``.
    Otherwise a frozen copy of the policy as it is now: ``(copy, None)``.
    """
    if cfg.use_peft:
        if not hasattr(policy, "disable_adapter"):
            raise ConfigError("use_peft is on but the policy has no LoRA adapter to disable")
        return None, policy.disable_adapter
    return freeze(copy.deepcopy(policy)), None


def _zero_head(hidden_size: int) -> nn.Module:
    """A ``ScalarHead`` that starts at zero, so the first advantages are the returns themselves."""
    head = ScalarHead(hidden_size)
    nn.init.zeros_(head.proj.weight)
    nn.init.zeros_(head.proj.bias)
    return head


def make_critic(cfg: PPOConfig, policy: nn.Module) -> nn.Module | None:
    """The critic of ``--critic separate`` (a :class:`ValueModel` on a copy of the policy's body), the value head
    of ``--critic shared`` (a ``ScalarHead``), or None when the estimator needs no values. Call before LoRA."""
    if cfg.estimator != "gae":
        return None
    if cfg.critic == "shared":
        return _zero_head(hidden_size(policy))
    critic = ValueModel(copy.deepcopy(decoder(policy)), hidden_size(policy))
    if cfg.use_peft:
        critic.body = apply_lora(critic.body, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                                 task_type="FEATURE_EXTRACTION")
    return critic


@dataclasses.dataclass
class Models:
    """The models and optimizers of a run (built by :func:`setup_models`).

    ``policy`` and ``critic`` are prepared by accelerate (DDP-wrapped when distributed); ``policy_u`` / ``critic_u``
    are the modules themselves (sampling and scoring run on them, outside DDP). The shared value head has no
    optimizer of its own: it is in ``optimizer`` with ``critic_learning_rate``, and ``trainable`` lists it beside
    the policy for gradient clipping.
    """

    policy: nn.Module
    critic: nn.Module | None
    ref_model: nn.Module | None
    ref_context: Any
    optimizer: Any
    scheduler: Any
    critic_optimizer: Any = None
    critic_scheduler: Any = None
    policy_u: nn.Module = None
    critic_u: nn.Module | None = None
    trainable: nn.Module = None
    saved_extra: dict = dataclasses.field(default_factory=dict)

    @property
    def optimizers(self) -> _Bundle:
        return _Bundle(policy=self.optimizer, critic=self.critic_optimizer)

    @property
    def schedulers(self) -> _Bundle:
        return _Bundle(policy=self.scheduler, critic=self.critic_scheduler)


def setup_models(cfg: PPOConfig, policy: nn.Module, acc, updates: int) -> Models:
    """Dropout off, critic (copied before LoRA), LoRA, reference, optimizers and schedulers over ``updates``
    optimizer steps, all prepared by ``acc``."""
    if cfg.disable_dropout:
        disable_dropout(policy)
    critic = make_critic(cfg, policy)
    if cfg.use_peft:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.to(acc.device)
    ref_model, ref_context = make_reference(cfg, policy)
    optimizer = loop.make_optimizer(cfg, policy.parameters())
    critic_optimizer = critic_scheduler = None
    critic_lr = cfg.critic_learning_rate or cfg.learning_rate
    if isinstance(critic, ValueModel):
        critic_optimizer = loop.make_optimizer(dataclasses.replace(cfg, learning_rate=critic_lr), critic.parameters())
        critic_scheduler = loop.make_scheduler(cfg, critic_optimizer, updates)
    elif critic is not None:  # the shared value head joins the policy's optimizer with its own learning rate
        optimizer.add_param_group({"params": list(critic.parameters()), "lr": critic_lr, "weight_decay": 0.0})
    scheduler = loop.make_scheduler(cfg, optimizer, updates)
    policy, optimizer = acc.prepare(policy, optimizer)
    if critic is not None:
        critic = acc.prepare(critic)
    if critic_optimizer is not None:
        critic_optimizer = acc.prepare(critic_optimizer)
    m = Models(policy, critic, ref_model, ref_context, optimizer, scheduler, critic_optimizer, critic_scheduler)
    m.policy_u = acc.unwrap_model(policy)
    m.critic_u = acc.unwrap_model(critic) if critic is not None else None
    m.trainable = nn.ModuleList([policy] + ([critic] if critic is not None and critic_optimizer is None else []))
    if critic is not None:  # a LoRA critic stores its adapter and head only
        m.saved_extra = {"critic": _CheckpointView(m.critic_u, trainable_only=cfg.use_peft and critic_optimizer is not None)}
    return m


def critic_values(critic, policy, sub: CompletionBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``V(s_t)`` at the predicting state of every response token of ``sub``: ``(N, T)``.

    A :class:`ValueModel` reads its own body; a shared head reads the policy's predicting states (``hidden``
    when the caller already has them)."""
    if isinstance(getattr(critic, "module", critic), ValueModel):
        ids, attn, pos = model_inputs(sub)
        p, t = sub.prompt_input_ids.shape[1], sub.completion_input_ids.shape[1]
        return critic(ids, attn, pos)[:, p - 1 : p - 1 + t].float()
    if hidden is None:
        hidden = predicting_states(hidden_states(policy, sub), sub)
    return critic(hidden).float()


@torch.no_grad()
def rollout_values(critic, policy, batch: CompletionBatch, chunk_rows: int) -> torch.Tensor:
    """Critic values of a whole rollout batch, ``chunk_rows`` rows per forward; 0 outside the response mask."""
    n, t = batch.completion_input_ids.shape
    out = torch.zeros(n, t, device=batch.completion_input_ids.device)
    for start in range(0, n, chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, n), device=out.device)
        sub, width = take_rows(batch, rows)
        out[rows, :width] = critic_values(critic, policy, sub)
    return torch.where(batch.completion_mask.to(torch.bool), out, torch.zeros((), device=out.device))
