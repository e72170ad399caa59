"""The config of ``finegrain po`` (:class:`POConfig`) and what a batch needs (:class:`Plan`), apart from the loop
(:mod:`finegrain.trainers.po`, which re-exports every name) so that its helper modules can import them."""

from __future__ import annotations

import dataclasses
from typing import Literal

from finegrain.config import TrainConfig, check_ranges, option
from finegrain.errors import ConfigError
from finegrain.losses import get_preference_loss_spec

DEFAULT_BETA = {"dpo": 0.1, "tdpo1": 0.1, "tdpo2": 0.1, "treg-dpo": 0.1, "simpo": 2.0, "treg-simpo": 2.0}
DEFAULT_ALPHA = 0.5  # TDPO2's α (Zeng et al., ICML 2024)
TREG_DEFAULT_ALPHA = 0.1  # T-REG's α: the best of the paper's grid {0.1, 0.25, 0.5} on the world (docs/methods/treg.md)
REG_SOURCES = ("contrastive", "dpo_implicit", "external")
"""The named token-reward sources of T-REG; any other ``reg_source`` is a reward spec (docs/reward-sources.md)."""
REG_MAPS = ("squash", "half", "identity")
SIMPO_GAMMA_RATIO = 0.5  # γ = 0.5 β by default: SimPO's recommended γ/β lies in 0.3-0.5 (Meng et al. 2024)


@dataclasses.dataclass
class POConfig(TrainConfig):
    """Offline preference optimisation on pairs: DPO, SimPO, TDPO1/TDPO2, T-REG (DPO-REG, SimPO-REG)."""

    loss: Literal["dpo", "simpo", "tdpo1", "tdpo2", "treg-dpo", "treg-simpo"] = option("dpo", "the preference loss")
    beta: float | None = option(None, "β; default 0.1 for dpo/tdpo1/tdpo2/treg-dpo, 2.0 for simpo/treg-simpo")
    alpha: float | None = option(None, "tdpo2: weight α of the KL difference (default 0.5); treg-*: weight of the "
                                       "token regulariser (default 0.1)")
    gamma: float | None = option(None, "simpo/treg-simpo: target reward margin γ (default 0.5·β)")
    label_smoothing: float = option(0.0, "dpo only: conservative-DPO label smoothing ε in [0, 0.5)")
    rpo_alpha: float | None = option(None, "dpo only: weight λ of an SFT term λ·NLL(chosen), the NLL averaged over "
                                           "the chosen response's tokens: DPO-SFT, T-REG's ablation (TRL's rpo_alpha)")
    reg_source: str = option(
        "contrastive", "treg-*: where the token rewards come from: contrastive (prompting with the reference; the data "
        "column when present, else computed), dpo_implicit (the current policy's own detached implicit rewards; not "
        "the paper's ablation), external (the data column, required), or any reward spec (implicit:RUN for a "
        "DPO-trained policy's token rewards, the paper's ablation; a reward-model directory; python:M:F; KIND[:ARG]), "
        "computed once over the data before training and mapped by --reg_map")
    reg_map: Literal["squash", "half", "identity"] | None = option(
        None, "treg-* with a reward spec as reg_source: how its token rewards r become r̂ in (−½, ½): squash "
              "(σ(r) − ½, the default), half (r/2, for a source in (−1, 1)) or identity (a source already in (−½, ½))")
    weighting: Literal["dpo_grad", "static"] = option("dpo_grad", "treg-*: sequence weight w = σ(−margin) or w = 1")
    token_reduction: Literal["sum", "mean"] | None = option(
        None, "treg-*: sum or mean of the token regulariser over a response; default: sum for dpo, mean for simpo")
    token_rewards_column: str = option("token_rewards", "treg-*: the columns chosen_<name> / rejected_<name> hold "
                                                        "per-token rewards in (−½, ½)")
    contrastive_template: Literal["auto", "control", "system", "draft"] = option(
        "auto", "treg-* with reg_source contrastive: the opposite prompts: draft (the paper's revision request, which "
        "contains the response), control (an instruction or prefix without it) or system (a system turn); auto: draft "
        "(on the built-in world: its revision requests)")
    contrastive_positive: str | None = option(None, "positive text (default: the template's); for draft, a goal of the "
                                                    "built-in request, or a whole request with {prompt} and {draft}")
    contrastive_negative: str | None = option(None, "negative text (default: the template's); as contrastive_positive")
    ref_model_name_or_path: str | None = option(None, "reference model; default: the policy's starting weights "
                                                      "(with --use_peft: the policy with its adapter disabled)")
    precompute_ref_log_probs: bool = option(False, "run the reference once over the data and cache its per-token "
                                                   "log-probs (not for TDPO, which needs full distributions)")
    chunk_size: int = option(1024, "response positions per chunk of the LM-head projection (memory vs speed)")
    learning_rate: float = option(5e-6, "peak learning rate")

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = get_preference_loss_spec(self.loss)
        treg, simpo = spec.needs_token_rewards, spec.length_normalized
        tdpo = spec.needs_ref_distribution
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss]
        if self.alpha is None:
            self.alpha = TREG_DEFAULT_ALPHA if treg else DEFAULT_ALPHA if self.loss == "tdpo2" else None
        elif not (treg or self.loss == "tdpo2"):
            raise ConfigError(f"--alpha is used by tdpo2 and treg-* only; drop it for --loss {self.loss}")
        check_ranges(self, positive=("beta", "chunk_size"), nonnegative=("alpha", "rpo_alpha"))
        if self.gamma is None:
            self.gamma = SIMPO_GAMMA_RATIO * self.beta if simpo else None
        elif not simpo:
            raise ConfigError(f"--gamma is SimPO's margin; drop it for --loss {self.loss}")
        if self.label_smoothing and self.loss != "dpo":
            raise ConfigError(f"--label_smoothing is conservative DPO; it does not apply to --loss {self.loss}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.loss != "dpo":
            raise ConfigError(f"--rpo_alpha adds an SFT term to DPO (DPO-SFT); it does not apply to --loss {self.loss}")
        treg_only = dict(reg_source="contrastive", reg_map=None, weighting="dpo_grad", token_reduction=None,
                         token_rewards_column="token_rewards", contrastive_template="auto",
                         contrastive_positive=None, contrastive_negative=None)
        if not treg:
            changed = [k for k, v in treg_only.items() if getattr(self, k) != v]
            if changed:
                raise ConfigError(f"--{changed[0]} is a T-REG option; use --loss treg-dpo or treg-simpo, or drop it")
        if not self.token_rewards_column.strip():
            raise ConfigError("token_rewards_column must name a column")
        if not str(self.reg_source).strip():
            raise ConfigError("reg_source must name a source: contrastive, dpo_implicit, external or a reward spec")
        if self.reg_map is not None and not reg_source_is_spec(self):
            raise ConfigError(f"--reg_map maps the rewards of a reward spec; --reg_source {self.reg_source} has its own "
                              "scale: drop --reg_map")
        if self.precompute_ref_log_probs and tdpo:
            raise ConfigError(f"--precompute_ref_log_probs cannot serve --loss {self.loss}: TDPO's per-token KL needs "
                              "the reference's full distribution at every position, which is not cached; drop the flag")
        if not needs_reference_model(self) and (self.precompute_ref_log_probs or self.ref_model_name_or_path):
            flag = "--precompute_ref_log_probs" if self.precompute_ref_log_probs else "--ref_model_name_or_path"
            raise ConfigError(f"--loss {self.loss}{' with --reg_source ' + self.reg_source if treg else ''} uses no "
                              f"reference model; drop {flag}")


def reg_source_is_spec(cfg: POConfig) -> bool:
    """Whether ``cfg.reg_source`` is a reward spec (computed once before training) rather than a named source."""
    return cfg.reg_source not in REG_SOURCES


def needs_reference_model(cfg: POConfig) -> bool:
    """Whether a run of ``cfg`` may need the reference at all (log-probs, KL, contrastive rewards, or a reward spec
    such as ``implicit:RUN`` that reads it)."""
    spec = get_preference_loss_spec(cfg.loss)
    return spec.needs_reference or (spec.needs_token_rewards and cfg.reg_source != "external")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each batch of one data set needs, derived once from the loss spec, the config and the data.

    Fields:
        ref_logps: per-token reference log-probs (``live`` from the reference model, or a cached column).
        ref_kl: TDPO's per-position forward KL (always live).
        token_rewards: ``None``, ``"column"`` (``batch.extras["token_rewards"]``), ``"contrastive"`` (computed
            with the reference per batch), ``"source"`` (a reward spec, to be computed into the column once before
            training), ``"dpo_implicit"`` or ``"zeros"`` (evaluation data without the column).
    """

    ref_logps: bool
    ref_kl: bool
    token_rewards: str | None

    @property
    def reference_model(self) -> bool:
        return self.ref_kl or self.token_rewards == "contrastive"
