"""Linear weights kept in their GGUF quantization ("gguf"): the file's 4..8-bit codes, repacked once at
load for the kernel (kernels/quantized_linear.cpp: AVX512-VNNI, or AVX2 where the CPU has no AVX-512),
dequantized in registers at each call.

    GGUF rows (Q4_K, Q6_K, Q4_1, ...) ─ gguf_blocks.decode ─▶ codes + group scales ─ pack ─▶ kernel layout
    y = quantized_linear(x, ...)        activations rounded to int8 per 32-block, int8 x uintN products

Resident size per weight: the code bits plus a float16 scale (and minimum) per group of 16 or 32, i.e.
4.5-5 bits for the 4-bit types, 7 for Q6_K, 8.5 for Q8_0 (the file's 4.5, 6.56 and 8.5).

A layer falls back to dequantized weights in the model's dtype (a plain matrix multiply, the "none"
method) when a shard of it came as float or of a type the kernel does not read, when its input is
split over ranks, when the kernel cannot be built, or when the CPU has neither AVX512-VNNI nor AVX2
(`GGUFQuantized(use_kernel=False)` forces that path, which tests compare with the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from scalellm.cpu import cpu_flags
from scalellm.engine.quantization.base import QuantizationMethod
from scalellm.engine.quantization.gguf_blocks import KERNEL_TYPES, GroupCodes, decode, merge


@dataclass
class GGUFTensor:
    """A GGUF tensor kept in its quantization: raw [rows, row_bytes] of `type_name`, logical [rows, cols]."""

    type_name: str
    raw: np.ndarray
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.cols)

    def rows(self, index) -> GGUFTensor:
        """A slice or permutation of the rows (each row is its own run of blocks)."""
        return GGUFTensor(self.type_name, np.ascontiguousarray(self.raw[index]), self.cols)

    def codes(self) -> GroupCodes:
        return decode(self.type_name, self.raw, self.cols)

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]."""
        return torch.from_numpy(self.codes().dequantize())


def pack(codes: GroupCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GroupCodes [N, K] -> (packed uint8, scales float16, minimums float16 or None): the kernel's layout
    (see quantized_linear.cpp), N padded to a multiple of 64 with zero codes and scales."""
    num_out, num_in = codes.codes.shape
    padded = -(-num_out // 64) * 64
    blocks = padded // 16
    steps = codes.group // 4
    groups = num_in // codes.group
    c = np.zeros((padded, num_in), np.uint8)
    c[:num_out] = codes.codes
    # [NB, 16, groups, steps, 4] -> [NB, groups, steps, 16 * 4]: one 64-byte vpdpbusd operand per step
    c = c.reshape(blocks, 16, groups, steps, 4).transpose(0, 2, 3, 1, 4).reshape(blocks, groups, steps, 64)
    if codes.bits == 8:
        planes = [c.reshape(blocks, groups, -1)]
    else:
        low = (c & 0x0F).reshape(blocks, groups, steps // 2, 2, 64)
        planes = [(low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(blocks, groups, -1)]
        if codes.bits > 4:  # the high bits of each step at its byte positions (see quantized_linear.cpp)
            width = codes.bits - 4
            per_byte = 8 // width  # steps per high-bit plane
            high = (c >> 4).reshape(blocks, groups, steps // per_byte, per_byte, 64)
            shifts = (np.arange(per_byte, dtype=np.uint8) * width).reshape(per_byte, 1)
            planes.append(np.bitwise_or.reduce(high << shifts, axis=3).reshape(blocks, groups, -1))
    side = 2 if codes.bits == 8 else 4  # channel blocks side by side per group (measured: quantized_linear.cpp)
    packed = _side_by_side(np.concatenate(planes, axis=-1), side)
    return (torch.from_numpy(packed), _group_halves(codes.scales, padded, side),
            None if codes.minimums is None else _group_halves(codes.minimums, padded, side))


def _side_by_side(per_block: np.ndarray, side: int) -> np.ndarray:
    """[NB, groups, X] per channel block -> [NB / side, groups, side * X]: each group's `side` blocks together."""
    blocks, groups, width = per_block.shape
    return np.ascontiguousarray(per_block.reshape(blocks // side, side, groups, width).transpose(0, 2, 1, 3)
                                .reshape(blocks // side, groups, side * width))


def _group_halves(values: np.ndarray, padded: int, side: int) -> torch.Tensor:
    """float32 [N, groups] -> float16 [padded / 16 / side, groups, 16 side] (zero padded), laid out as the codes."""
    out = np.zeros((padded, values.shape[1]), np.float16)
    out[:values.shape[0]] = values
    return torch.from_numpy(_side_by_side(out.reshape(padded // 16, 16, -1).transpose(0, 2, 1), side))


class GGUFQuantized(QuantizationMethod):
    name = "gguf"
    keeps_gguf_types = KERNEL_TYPES
    """The GGUF types a layer may receive as GGUFTensor (Linear.load keeps them per shard)."""

    def __init__(self, use_kernel: bool = True) -> None:
        self.use_kernel = use_kernel

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        quantized = getattr(layer, "gguf_shards", None)
        op = kernel_op() if self.use_kernel else None
        layer.quantized_op = None
        if quantized and op is not None and layer.weight.device.type == "cpu" and len(quantized) == len(layer.shards):
            codes = merge([quantized[name].codes() for name in layer.shards])
            packed, scales, minimums = pack(codes)
            layer.register_buffer("qweight_packed", packed, persistent=False)
            layer.register_buffer("qweight_scales", scales, persistent=False)
            layer.register_buffer("qweight_minimums", minimums, persistent=False)
            layer.qweight_meta = (codes.codes.shape[0], codes.bits, codes.group, codes.zero_point)
            if layer.bias is not None:
                layer.register_buffer("bias_f32", layer.bias.data.float(), persistent=False)
            layer.quantized_op = op
            layer.weight = None
        elif quantized:  # the fallback: dequantize into the float weight
            for name, tensor in quantized.items():
                offset, _ = layer.shards[name]
                layer.weight.data[offset:offset + tensor.shape[0]].copy_(tensor.dequantize())
        layer.gguf_shards = {}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.quantized_op is None:
            return F.linear(x, layer.weight, layer.bias)
        bias = layer.bias_f32 if layer.bias is not None else None
        x_in = x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float()
        return layer.quantized_op(x_in, layer.qweight_packed, layer.qweight_scales, layer.qweight_minimums, bias,
                                  *layer.qweight_meta).to(x.dtype)


def kernel_op():
    """The compiled quantized_linear op where this CPU has a kernel ISA (kernel_isa) and it builds; else None."""
    if kernel_isa() is None:
        return None
    from scalellm.engine.layers.kernels import load_quantized_linear

    return load_quantized_linear()


KERNEL_ISAS = {"avx512-vnni": {"avx512_vnni", "avx512f", "avx512bw"}, "avx2": {"avx2", "fma", "f16c"}}
"""The kernel's instruction sets, the first a CPU has in full is the one -march=native builds."""


def kernel_isa() -> str | None:
    """The instruction set the quantized kernel runs on here (a key of KERNEL_ISAS), or None."""
    return next((isa for isa, needs in KERNEL_ISAS.items() if needs <= cpu_flags()), None)
