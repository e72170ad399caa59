"""Masked tensor maths shared by every loss, reward and metric (imports torch only)."""

from finegrain.ops.masked import last_token_index, masked_mean, masked_sum, masked_var, masked_whiten

__all__ = ["last_token_index", "masked_mean", "masked_sum", "masked_var", "masked_whiten"]
