"""Model FLOPs and MFU for the benchmarks: :mod:`finegrain.models.flops` (the trainers log MFU with it too)."""

from finegrain.models.flops import PEAK_BF16_FLOPS, ModelFlops, lora_params, mfu, model_flops, peak_bf16_flops

__all__ = ["PEAK_BF16_FLOPS", "ModelFlops", "lora_params", "mfu", "model_flops", "peak_bf16_flops"]
