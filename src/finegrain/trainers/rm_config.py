"""The config of ``finegrain rm``, apart from the loop (:mod:`finegrain.trainers.rm`, which re-exports it) so that
:mod:`finegrain.trainers.rm_data` can import it."""

from __future__ import annotations

import dataclasses
from typing import Literal

from finegrain.config import TrainConfig, check_ranges, option
from finegrain.errors import ConfigError


@dataclasses.dataclass
class RMConfig(TrainConfig):
    """Reward models: sequence (Bradley-Terry), sentence (SRM), token (minimal edits), discriminator (TLCR)."""

    level: Literal["sequence", "sentence", "token", "discriminator"] = option("sequence", "granularity of the reward model")
    credit_dataset_name: str | None = option(None, "token-credit ground truth for the AUROC: world credit rows {prompt, "
                                             "response, words, credit}, token rows {prompt, response, labels|spans} or "
                                             "revision rows (edit labels); default on the world: data/credit_test.jsonl")
    eval_revisions_name: str | None = option(None, "held-out revision rows for the token levels' edit metrics; default "
                                             "on the world: revisions of its test pairs by its reviser")
    max_credit_samples: int | None = option(256, "use only the first N token-credit rows")
    label_unit: Literal["word", "token", "char"] = option("word", "alignment unit of edit labels computed from revisions")
    center_rewards_coefficient: float = option(0.0, "Bradley-Terry reward centering c·(r_w + r_l)^2 (sequence, sentence)")
    score_bias: bool = option(False, "sequence RM: give the score head a bias b, r = w·h + b (the head before the "
                              "bias-free default; Bradley-Terry cannot determine b, TRL's score head has none)")
    no_edit_pairs: Literal["auto", "keep", "drop"] = option(
        "auto", "revision rows whose alignment finds no edit: keep (every token neutral; TLCR's official code trains "
        "them toward (1/2, 1/2)) or drop (no edit signal); auto: keep for the discriminator, drop for the token RM")
    # sentence
    boundary_mode: Literal["insert", "mark"] = option("insert", "sentence boundaries: insert <END> tokens (embedding "
                                                      "resized) or mark the last token of each sentence")
    splitter: Literal["rule", "punct", "sat"] | None = option(None, "sentence splitter: rule (abbreviation and case "
                                                             "rules), punct (every terminator), sat (wtpsplit SaT, "
                                                             "model on disk); default: punct on the built-in world "
                                                             "(lowercase text), else rule")
    sat_model: str = option("sat-3l", "SaT model name in the local Hugging Face cache, or a directory")
    reward_embed_dim: int = option(128, "SRM query/key size d")
    max_sentences: int = option(100, "most sentence boundaries per response (RoPE range; e_0 counts); more are merged")
    weighted_sum: bool = option(True, "SRM attention aggregation (false: the plain-sum ablation)")
    srm_l2_coef: float = option(0.0, "SRM penalty λ·(R_w^2 + R_l^2)")
    spread: bool = option(True, "token-credit evaluation of the sentence RM: spread a_j·s_j over the sentence's tokens "
                          "(false: on its last token)")
    # token
    objective: Literal["edit_bt", "token_cls"] = option("edit_bt", "token RM objective: A edit_bt (edit-focused BT + "
                                                        "sequence BT) or B token_cls (token classification)")
    seq_weight: float = option(1.0, "token RM objective A: weight of the sequence Bradley-Terry term")
    edit_weight: float = option(1.0, "token RM objective A: weight of the edit term (0: plain Bradley-Terry on the "
                                "summed token rewards, which also trains on pairs)")
    seq_pairs: Literal["chosen", "revised"] = option("chosen", "token RM objective A: the sequence term compares the "
                                                     "rejected response with the original chosen one (revised where "
                                                     "a row has none) or with the revision")
    cls_loss: Literal["mse", "ce"] = option("mse", "token RM objective B: MSE on the scalar reward or 3-way cross-entropy")
    # discriminator
    hard_labels: bool = option(False, "TLCR: hard-label cross-entropy on changed tokens only (default: soft targets)")
    double_softmax: bool = option(False, "TLCR compatibility: the official code's second softmax in the reward")
    lag: int = option(0, "TLCR compatibility: credit token t-lag's score to token t (official code: 1)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_embed_dim <= 0 or self.reward_embed_dim % 2:
            raise ConfigError(f"reward_embed_dim must be a positive even number (RoPE), got {self.reward_embed_dim}")
        if self.max_sentences < 2:
            raise ConfigError(f"max_sentences must be >= 2 (the prompt boundary and one sentence), got {self.max_sentences}")
        check_ranges(self, nonnegative=("lag", "seq_weight", "edit_weight", "center_rewards_coefficient",
                                        "srm_l2_coef"))
        if self.level == "token" and self.objective == "edit_bt" and self.edit_weight == 0 and self.seq_weight == 0:
            raise ConfigError("--edit_weight 0 and --seq_weight 0 leave objective A without a loss; set one > 0")

    @property
    def keeps_no_edit_pairs(self) -> bool:
        """Whether revision rows without any edit are trained on (``no_edit_pairs``; auto: the discriminator)."""
        return self.no_edit_pairs == "keep" or (self.no_edit_pairs == "auto" and self.level == "discriminator")
