"""W8A8 dynamic int8: int8 weights with one scale per output channel, activations quantized per token
at run time, int8 x int8 -> int32 matrix multiply (torch._int_mm: VNNI on x86 CPUs).

    x [T, K] ─ per-row absmax ─▶ x_q int8, s_x [T, 1]
    y = (x_q @ W_q^T) * s_x * s_w        W_q int8 [N, K], s_w [N]

Each token is quantized on its own, so a request's outputs do not depend on the rest of the batch.

On the CPU the three stages run as one C++ op (kernels/int8_linear.cpp: AVX512-VNNI, weights in a
packed tile layout, bit for bit the result of the torch path below); the torch path serves other
devices and machines where the kernel cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def pack_for_vnni(weight_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 W [N, K] -> (packed [ceil(N/16), ceil(K/4), 16, 4], compensation int32 [ceil(N/16) * 16]).

    packed[b, d, j, i] = W[16 b + j, 4 d + i], zero padded: the operand layout of the fused kernel.
    compensation[n] = 128 * sum_k W[n, k], which the kernel subtracts (it feeds activations + 128).
    """
    num_out, num_in = weight_q.shape
    padded_out, padded_in = -(-num_out // 16) * 16, -(-num_in // 4) * 4
    padded = F.pad(weight_q, (0, padded_in - num_in, 0, padded_out - num_out))
    packed = padded.view(padded_out // 16, 16, padded_in // 4, 4).permute(0, 2, 1, 3).contiguous()
    compensation = F.pad(weight_q.sum(dim=1, dtype=torch.int32) * 128, (0, padded_out - num_out))
    return packed, compensation


class Int8Dynamic(QuantizationMethod):
    name = "int8"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        quantized, scales = quantize_rows(layer.weight.data)
        layer.register_buffer("weight_scales", scales, persistent=False)  # [N]
        layer.out_features = quantized.shape[0]
        layer.fused_op = _fused_op(quantized.device)
        if layer.fused_op is not None:
            packed, compensation = pack_for_vnni(quantized)
            layer.register_buffer("weight_packed", packed, persistent=False)
            layer.register_buffer("weight_compensation", compensation, persistent=False)
            if layer.bias is not None:
                layer.register_buffer("bias_f32", layer.bias.data.float(), persistent=False)
        else:
            layer.register_buffer("weight_q", quantized, persistent=False)  # [N, K]
        layer.weight = None

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.fused_op is None:
            return int8_linear(x, layer.weight_q.t(), layer.weight_scales, layer.bias)
        bias = layer.bias_f32 if layer.bias is not None else None
        x_in = x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        out = layer.fused_op(x_in, layer.weight_packed, layer.weight_compensation, layer.weight_scales, bias,
                             layer.out_features)
        return out.to(x.dtype)


def _fused_op(device: torch.device):
    """The C++ fused op for weights on `device`, or None (not a CPU, or the kernel cannot be built)."""
    if device.type != "cpu":
        return None
    from scalellm.engine.layers.kernels import load_int8_linear

    return load_int8_linear()
