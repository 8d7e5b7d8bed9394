"""GGUF quantized blocks decoded into one common form: integer codes with a scale (and a minimum)
per group of 16 or 32 weights along the input dimension.

    w[n, k] = scale[n, g] * (code[n, k] - zero_point)          symmetric types (Q4_0 Q5_0 Q6_K Q8_0)
    w[n, k] = scale[n, g] * code[n, k] + minimum[n, g]         types with a minimum (Q4_1 Q5_1 Q4_K Q5_K)
    g = k // group

Codes are unsigned (Q8_0's signed bytes are stored + 128), so one kernel serves every type. The K-quants'
two-level scales (a float16 super-scale times a 6- or 8-bit sub-scale) are multiplied out here; the
kernel stores them in float16 (quantized_linear.py), the only rounding this adds to the file's values.
Rows are independent (each row is its own run of blocks), so row slices and row permutations apply
to quantized tensors as they do to float ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KERNEL_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""GGUF tensor types the quantized kernel keeps; others are dequantized at load."""


@dataclass
class GroupCodes:
    """A [N, K] weight as codes, per-group scales and either per-group minimums or a zero point."""

    codes: np.ndarray  # uint8 [N, K]
    scales: np.ndarray  # float32 [N, K // group]
    minimums: np.ndarray | None  # float32 [N, K // group], or None (symmetric: zero_point applies)
    bits: int
    group: int
    zero_point: int  # 0 when minimums are given

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]."""
        codes = self.codes.astype(np.float32).reshape(*self.scales.shape, self.group)
        if self.minimums is None:
            weight = (codes - self.zero_point) * self.scales[..., None]
        else:
            weight = codes * self.scales[..., None] + self.minimums[..., None]
        return weight.reshape(self.codes.shape)


def decode(type_name: str, raw: np.ndarray, num_in: int) -> GroupCodes:
    """raw uint8 [N, row_bytes] of GGUF type `type_name` with K = num_in -> GroupCodes."""
    blocks = raw.reshape(raw.shape[0], -1, _BLOCK_BYTES[type_name])  # [N, blocks, bytes]
    return _DECODERS[type_name](blocks, num_in)


_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each block, as float32 [N, blocks]."""
    return blocks[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) per block -> bit j of it for elements j = 0..31."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")  # [..., 32]
    return bits.astype(np.uint8)


def _legacy(blocks, num_in, bits, with_min):
    scale = _f16(blocks, 0)
    offset = 4 if with_min else 2
    minimum = _f16(blocks, 2) if with_min else None
    if bits == 5:
        high = _high_bits_32(blocks[..., offset:offset + 4]) << 4
        offset += 4
    codes = _nibbles_32(blocks[..., offset:offset + 16])
    if bits == 5:
        codes = codes | high
    n = blocks.shape[0]
    zero_point = 0 if with_min else 1 << (bits - 1)
    return GroupCodes(codes.reshape(n, num_in), scale, minimum, bits, 32, zero_point)


def _q8_0(blocks, num_in):
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return GroupCodes(codes.reshape(blocks.shape[0], num_in), _f16(blocks, 0), None, 8, 32, 128)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit sub-scales and eight 6-bit sub-minimums."""
    p = packed.astype(np.uint8)
    low_sc, low_m = p[..., 0:4] & 63, p[..., 4:8] & 63
    high_sc = (p[..., 8:12] & 0x0F) | ((p[..., 0:4] >> 6) << 4)
    high_m = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return (np.concatenate([low_sc, high_sc], axis=-1).astype(np.float32),
            np.concatenate([low_m, high_m], axis=-1).astype(np.float32))


def _k_quant(blocks, num_in, bits):
    n, nb = blocks.shape[:2]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sub_scales, sub_mins = _k_scales(blocks[..., 4:16])
    offset = 16
    if bits == 5:
        qh = blocks[..., 16:48]  # [n, nb, 32]: bit s of byte l is element l of sub-block s
        offset = 48
    qs = blocks[..., offset:offset + 128].reshape(n, nb, 4, 32)  # chunk c: sub-blocks 2c (low), 2c+1 (high)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb, 8, 32)
    if bits == 5:
        shifts = np.arange(8, dtype=np.uint8).reshape(8, 1)
        codes = codes | (((qh[:, :, None, :] >> shifts) & 1) << 4)
    scales = d[..., None] * sub_scales  # [n, nb, 8]
    minimums = -(dmin[..., None] * sub_mins)
    return GroupCodes(codes.reshape(n, num_in), scales.reshape(n, -1), minimums.reshape(n, -1), bits, 32, 0)


def _q6_k(blocks, num_in):
    n, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n, nb, 2, 64)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 32)
    sub_scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [n, nb, 16]
    d = _f16(blocks, 208)
    # per half of 128: four runs of 32 from (ql[0:32] low, ql[32:64] low, ql[0:32] high, ql[32:64] high)
    low = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=3)
    high = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=3)
    codes = (low | (high << 4)).reshape(n, num_in)
    scales = (d[..., None] * sub_scales).reshape(n, -1)
    return GroupCodes(codes, scales, None, 6, 16, 32)


_DECODERS = {
    "Q4_0": lambda b, k: _legacy(b, k, 4, False),
    "Q4_1": lambda b, k: _legacy(b, k, 4, True),
    "Q5_0": lambda b, k: _legacy(b, k, 5, False),
    "Q5_1": lambda b, k: _legacy(b, k, 5, True),
    "Q8_0": _q8_0,
    "Q4_K": lambda b, k: _k_quant(b, k, 4),
    "Q5_K": lambda b, k: _k_quant(b, k, 5),
    "Q6_K": _q6_k,
}


def merge(parts: list[GroupCodes]) -> GroupCodes:
    """Stack the row blocks of a fused projection (q | k | v) into one GroupCodes.

    Parts of different types meet at the widest codes, the finest group and, when any part has
    minimums, minimums for all (a symmetric part's minimum is -zero_point * scale).
    """
    group = min(p.group for p in parts)
    bits = max(p.bits for p in parts)
    bits = 6 if bits == 5 and group == 16 else bits  # the kernel's 5-bit layout needs groups of 32
    with_min = any(p.minimums is not None for p in parts)
    zero_point = 0 if with_min else 1 << (bits - 1)
    codes, scales, minimums = [], [], []
    for p in parts:
        repeat = p.group // group
        part_scales = np.repeat(p.scales, repeat, axis=1)
        part_codes = p.codes
        if p.minimums is not None:
            minimums.append(np.repeat(p.minimums, repeat, axis=1))
        elif with_min:
            minimums.append(-p.zero_point * part_scales)
        else:  # symmetric everywhere: move the codes to the common zero point
            part_codes = (part_codes.astype(np.int16) - p.zero_point + zero_point).astype(np.uint8)
        codes.append(part_codes)
        scales.append(part_scales)
    return GroupCodes(np.concatenate(codes), np.concatenate(scales),
                      np.concatenate(minimums) if with_min else None, bits, group, zero_point)
