"""Pure loss functions on tensors (imports torch only), and what each preference loss needs from a trainer.

A trainer resolves the configured loss name once, with :func:`get_preference_loss_spec`, and computes only what
the returned :class:`PreferenceLossSpec` asks for (its fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from finegrain.errors import ConfigError
from finegrain.losses.dpo import PreferenceLossOutput, dpo_loss, simpo_loss
from finegrain.losses.tdpo import TDPO_VARIANTS, tdpo_loss
from finegrain.losses.treg import treg_loss

__all__ = [
    "PREFERENCE_LOSSES",
    "TDPO_VARIANTS",
    "PreferenceLossOutput",
    "PreferenceLossSpec",
    "dpo_loss",
    "get_preference_loss_spec",
    "simpo_loss",
    "tdpo_loss",
    "treg_loss",
]


@dataclass(frozen=True)
class PreferenceLossSpec:
    """What an offline preference loss needs, declared once per loss name (every flag False unless set).

    Fields:
        name: the loss name as written in configs (``dpo``, ``simpo``, ``tdpo1``, ``tdpo2``, ``treg-dpo``,
            ``treg-simpo``).
        needs_reference: the loss uses reference token log-probs (a reference forward pass, or cached columns).
        needs_ref_distribution: the loss needs the reference's full distribution at every response position
            (TDPO's per-token KL), so reference log-probs cannot be precomputed as one number per token.
        needs_token_rewards: the loss consumes per-token rewards ``r̂`` (T-REG).
        length_normalized: sequence log-probs are divided by the response length (SimPO and SimPO-REG).
    """

    name: str
    needs_reference: bool = False
    needs_ref_distribution: bool = False
    needs_token_rewards: bool = False
    length_normalized: bool = False


_SPECS = {
    spec.name: spec
    for spec in (
        PreferenceLossSpec("dpo", needs_reference=True),
        PreferenceLossSpec("simpo", length_normalized=True),
        PreferenceLossSpec("tdpo1", needs_reference=True, needs_ref_distribution=True),
        PreferenceLossSpec("tdpo2", needs_reference=True, needs_ref_distribution=True),
        PreferenceLossSpec("treg-dpo", needs_reference=True, needs_token_rewards=True),
        PreferenceLossSpec("treg-simpo", needs_token_rewards=True, length_normalized=True),
    )
}

PREFERENCE_LOSSES: tuple[str, ...] = tuple(_SPECS)


def get_preference_loss_spec(name: str) -> PreferenceLossSpec:
    """The :class:`PreferenceLossSpec` of the preference loss called ``name``.

    Args:
        name: one of :data:`PREFERENCE_LOSSES`.

    Returns:
        The spec.

    Raises:
        ConfigError: for an unknown name; the message lists the valid names.

    Example:
        >>> get_preference_loss_spec("tdpo2").needs_ref_distribution
        True
    """
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preference loss {name!r}; choose one of: {', '.join(PREFERENCE_LOSSES)}"
        ) from None
