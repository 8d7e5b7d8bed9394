"""W8A8 dynamic int8: int8 weights with one scale per output channel, activations quantized per token
at run time, int8 x int8 -> int32 matrix multiply (torch._int_mm: VNNI on x86 CPUs).

    x [T, K] ─ per-row absmax ─▶ x_q int8, s_x [T, 1]
    y = (x_q @ W_q^T) * s_x * s_w        W_q int8 [N, K], s_w [N]

Each token is quantized on its own, so a request's outputs do not depend on the rest of the batch.
"""

from __future__ import annotations

import torch

from scalellm.engine.quantization.base import QuantizationMethod


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: returns (int8 [R, C], float32 scales [R])."""
    matrix = matrix.float()
    scales = matrix.abs().amax(dim=1).clamp_min(1e-8) / 127.0
    quantized = torch.round(matrix / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return quantized, scales


def int8_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scales: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] float; weight_t int8 [K, N] (a transposed view); weight_scales [N] -> [T, N] in x's dtype."""
    x32 = x.float()
    x_scales = x32.abs().amax(dim=1, keepdim=True).clamp_min_(1e-8).div_(127.0)  # [T, 1]
    x_q = torch.round(x32 / x_scales).to(torch.int8)
    out = torch._int_mm(x_q, weight_t).float()  # [T, N] int32 -> float
    out.mul_(x_scales).mul_(weight_scales)
    if bias is not None:
        out.add_(bias)
    return out.to(x.dtype)


class Int8Dynamic(QuantizationMethod):
    name = "int8"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        quantized, scales = quantize_rows(layer.weight.data)
        layer.register_buffer("weight_q", quantized, persistent=False)  # [N, K]
        layer.register_buffer("weight_scales", scales, persistent=False)  # [N]
        layer.weight = None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, layer.weight_q.t(), layer.weight_scales, layer.bias)
