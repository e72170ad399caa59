"""Model FLOPs and model-FLOPs utilisation (MFU) against a device's peak.

MFU (Chowdhery et al. 2022, "PaLM", appendix B) is the FLOPs the model *needs* for the work done, divided by the
time taken and by the device's peak: recomputation (activation checkpointing, the chunked LM head's backward) and
padding do not count. For a decoder with matmul weights ``N`` (every linear layer, the LM head included, not the
embedding lookup), ``L`` layers and attention width ``d_attn`` (heads x head dimension), the forward pass over one
sequence of ``n`` tokens whose LM head runs at ``h`` positions costs::

    F(n, h) = 2 * N_body * n + 2 * N_head * h + 4 * L * d_attn * n^2

(``2 * params`` per token for the matmuls, and ``QK^T`` plus ``AV`` over the full ``n x n`` square, as PaLM counts
attention; a causal kernel skips half of it, so this convention gives a slightly higher MFU than the causal
count). A training step is ``3 F`` for the model being trained (forward + backward, the backward costing twice the
forward) plus ``F`` for every frozen model run forward only (a DPO reference). With LoRA (Hu et al. 2021) the
frozen weights get no gradient, so their backward costs one forward (the input gradients) instead of two, while
attention, having no weights, still costs twice its forward; the adapters (``r (d_in + d_out)`` weights per adapted
layer) cost three times their forward: ``2 (2 N_body n + 2 N_head h) + 3 (4 L d_attn n^2) + 6 N_lora n``.
Decoding one token at context ``c`` costs ``2 N + 4 L d_attn c``.

Peak figures are dense (no structured sparsity) bfloat16 tensor-core FLOP/s from the vendors' data sheets; a
device not in :data:`PEAK_BF16_FLOPS` (a CPU) gets a measured peak instead: :func:`measured_peak_flops` times a
square matmul in the run's own dtype and thread count (what the training logs' MFU divides by, and says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (pattern matched against torch.cuda.get_device_name(), device, dense bf16 FLOP/s). Order matters: the first match
# wins, so the H100 variants come before the plain "H100" (the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, str, float], ...] = (
    (r"H100.*(PCIE|PCI-E)", "H100 PCIe", 756e12),
    (r"H100.*NVL", "H100 NVL", 835e12),
    (r"H100", "H100 SXM", 989e12),
    (r"H200", "H200", 989e12),
    (r"A100", "A100", 312e12),
    (r"L40S", "L40S", 362e12),
    (r"\bL4\b", "L4", 121e12),
)


def peak_bf16_flops(device_name: str) -> tuple[str, float] | None:
    """``(device, dense bf16 FLOP/s)`` for a CUDA device name such as ``"NVIDIA H100 80GB HBM3"``, or None."""
    name = device_name.upper()
    for pattern, device, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return device, peak
    return None


@dataclass(frozen=True)
class ModelFlops:
    """The quantities of a decoder that its FLOPs depend on (see the module docstring)."""

    body_params: int  # matmul weights of the transformer layers
    head_params: int  # matmul weights of the LM head (vocab x hidden), counted even when tied to the embedding
    layers: int
    attn_width: int  # heads x head dimension

    def forward(self, tokens: int, head_positions: int | None = None) -> float:
        """Forward FLOPs of one sequence of ``tokens`` tokens, the LM head at ``head_positions`` of them (all)."""
        h = tokens if head_positions is None else head_positions
        return 2.0 * self.body_params * tokens + 2.0 * self.head_params * h + 4.0 * self.layers * self.attn_width * tokens**2

    def train(self, tokens: int, head_positions: int | None = None, *, lora_params: int | None = None) -> float:
        """Forward + backward FLOPs of training on one sequence: ``3 F``, or with LoRA adapters of ``lora_params``
        weights on frozen base weights ``2 W + 3 A + 6 N_lora n`` (``W`` the weight matmuls' and ``A`` attention's
        share of ``F``; see the module docstring)."""
        h = tokens if head_positions is None else head_positions
        weights = 2.0 * self.body_params * tokens + 2.0 * self.head_params * h
        attention = 4.0 * self.layers * self.attn_width * tokens**2
        if lora_params is None:
            return 3.0 * (weights + attention)
        return 2.0 * weights + 3.0 * attention + 6.0 * lora_params * tokens

    def decode(self, context: int) -> float:
        """FLOPs of generating one token with a KV cache of ``context`` positions."""
        return 2.0 * (self.body_params + self.head_params) + 4.0 * self.layers * self.attn_width * context


def model_flops(model) -> ModelFlops:
    """Count ``model``'s matmul weights (every ``nn.Linear`` weight; the output head separately) and read its
    layer count and attention width from its config."""
    from torch import nn

    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelFlops(body_params=int(body), head_params=int(head.weight.numel()), layers=int(c.num_hidden_layers),
                      attn_width=int(c.num_attention_heads * head_dim))


def lora_params(model, r: int) -> int:
    """Weights of rank-``r`` LoRA adapters on every ``nn.Linear`` of ``model`` but its output head (peft's
    ``target_modules="all-linear"``): ``r (d_in + d_out)`` each."""
    from torch import nn

    head = model.get_output_embeddings()
    return int(sum(r * (m.in_features + m.out_features) for m in model.modules()
                   if isinstance(m, nn.Linear) and m is not head))


def mfu(flops: float, seconds: float, peak: float) -> float:
    """Model-FLOPs utilisation: ``flops / seconds / peak``."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds and peak must be positive, got {seconds} and {peak}")
    return flops / seconds / peak


_MEASURED: dict[tuple[str, str, int], float] = {}


def measured_peak_flops(device: str = "cpu", dtype=None, size: int = 1024, repeats: int = 8) -> float:
    """FLOP/s of a ``size x size`` matmul in ``dtype`` on ``device`` with the current thread count: the best of
    ``repeats`` timed products (``2 size^3`` FLOPs each) after one warm-up, measured once per process and setting.

    A practical peak (what this machine's matmul kernels reach now), not a data-sheet figure: MFU against it says how
    much of the reachable arithmetic a step uses.
    """
    import time

    import torch

    dtype = dtype or torch.float32
    key = (str(device), str(dtype), torch.get_num_threads())
    if key not in _MEASURED:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        (a @ b).sum().item()
        best = float("inf")
        for _ in range(repeats):
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            (a @ b).sum().item()
            best = min(best, time.perf_counter() - t)
        _MEASURED[key] = 2.0 * size**3 / best
    return _MEASURED[key]


def device_peak_flops(device, dtype=None) -> tuple[float, str]:
    """The peak MFU is taken against, and where it comes from: a CUDA device's data-sheet bf16 figure
    (:data:`PEAK_BF16_FLOPS`), else :func:`measured_peak_flops` on it."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        known = peak_bf16_flops(torch.cuda.get_device_name(dev))
        if known is not None:
            return known[1], f"{known[0]} data-sheet dense bf16 peak"
    peak = measured_peak_flops(str(dev), dtype)
    return peak, f"measured {str(dtype or torch.float32).removeprefix('torch.')} 1024x1024 matmul on {dev.type}, {torch.get_num_threads()} thread(s)"
