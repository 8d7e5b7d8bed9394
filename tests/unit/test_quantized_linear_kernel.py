"""The GGUF-quantized linear kernel: block decoding against the gguf package, the kernel against the
same arithmetic in float64, and the layer's kernel path against its dequantized fallback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from scalellm.engine.layers.kernels import load_quantized_linear_avx2
from scalellm.engine.quantization.gguf import GGUFQuantized, GGUFTensor, kernel_isa, kernel_op, pack
from scalellm.engine.quantization.gguf_blocks import KERNEL_TYPES, merge

_K_BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def make_tensor(type_name: str, rows: int, cols: int, seed: int = 0) -> GGUFTensor:
    """A [rows, cols] tensor of `type_name`: quantized by the gguf package, or (K types, which it cannot
    quantize) random blocks with plausible float16 super-scales."""
    rng = np.random.default_rng(seed)
    if type_name not in _K_BLOCK_BYTES:
        weight = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
        return GGUFTensor(type_name, quants.quantize(weight, GGMLQuantizationType[type_name]), cols)
    size = _K_BLOCK_BYTES[type_name]
    blocks = rng.integers(0, 256, (rows, cols // 256, size), dtype=np.uint8)
    scales = (rng.random((rows, cols // 256, 2)) * 2e-3 + 1e-4).astype(np.float16).view(np.uint8)
    where = [208, 209] if type_name == "Q6_K" else [0, 1, 2, 3]
    blocks[..., where] = scales.reshape(rows, cols // 256, 4)[..., :len(where)]
    return GGUFTensor(type_name, blocks.reshape(rows, -1), cols)


@pytest.mark.parametrize("type_name", KERNEL_TYPES)
def test_decoding_matches_the_gguf_package(type_name):
    tensor = make_tensor(type_name, 5, 512)
    expected = quants.dequantize(tensor.raw, GGMLQuantizationType[type_name]).reshape(5, 512)
    np.testing.assert_allclose(tensor.codes().dequantize(), expected, rtol=1e-6, atol=1e-7)


def reference(x: torch.Tensor, codes, bias=None) -> torch.Tensor:
    """The kernel's contract (quantized_linear.cpp) in float64, scales rounded to float16 as stored."""
    x = x.float()
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32)
    d = blocks.abs().amax(dim=2, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv).reshape(m, k).double()
    x_dequantized = (xq.reshape(m, k // 32, 32) * d.double()).reshape(m, k)
    stored = type(codes)(codes.codes, codes.scales.astype(np.float16).astype(np.float32),
                         None if codes.minimums is None else codes.minimums.astype(np.float16).astype(np.float32),
                         codes.bits, codes.group, codes.zero_point)
    weight = torch.from_numpy(stored.dequantize()).double()
    out = x_dequantized @ weight.T
    return out if bias is None else out + bias.double()


def run_kernel(op, x, codes, bias=None):
    packed, scales, minimums = pack(codes)
    return op(x, packed, scales, minimums, bias, codes.codes.shape[0], codes.bits, codes.group, codes.zero_point)


needs_kernel = pytest.mark.skipif(kernel_op() is None, reason="no AVX512-VNNI or AVX2, or the kernel does not build")


@pytest.fixture(params=["native", "avx2"])
def op(request):
    """The op as built for this CPU, and on an AVX-512 CPU its AVX2 path built alone (-mno-avx512f)."""
    if request.param == "native":
        return kernel_op()
    if kernel_isa() != "avx512-vnni":
        pytest.skip("the native build is the AVX2 path here")
    avx2 = load_quantized_linear_avx2()
    assert avx2 is not None, "the AVX2 build failed on an AVX-512 CPU"
    return avx2


@needs_kernel
@pytest.mark.parametrize("type_name", KERNEL_TYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 12, 15, 16, 33, 130])
def test_kernel_matches_its_contract(op, type_name, m):
    codes = make_tensor(type_name, 101, 512, seed=m).codes()  # 101 outputs: a 64-channel group, a partial one
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(101)
    out = run_kernel(op, x, codes, bias)
    expected = reference(x, codes, bias)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * scale)


@needs_kernel
@pytest.mark.parametrize("type_name", KERNEL_TYPES)
@pytest.mark.parametrize("m", [1, 2, 16])
def test_largest_codes_against_largest_activations(op, type_name, m):
    """Every code at its largest against activations of +127 and -127 (and a row alternating them): the
    steps whose products the AVX2 path sums in int16 before widening (two under 8 bits) stay exact; with
    four, 6-bit codes overflow here."""
    codes = make_tensor(type_name, 64, 512, seed=7).codes()
    largest = dataclasses.replace(codes, codes=np.full_like(codes.codes, (1 << codes.bits) - 1))
    signs = torch.tensor([1.0, -1.0, 1.0])[torch.arange(m) % 3]
    x = torch.ones(m, 512) * signs[:, None]
    if m > 2:
        x[2] = torch.tensor([1.0, -1.0]).repeat(256)
    out = run_kernel(op, x, largest)
    expected = reference(x, largest)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@needs_kernel
def test_activation_rounding_ties_and_zero_blocks(op):
    """Blocks whose scaled values fall halfway round half to even, and an all-zero block (d = 0) adds 0."""
    codes = make_tensor("Q4_1", 64, 256, seed=3).codes()
    x = torch.zeros(3, 256)
    x[0, :6] = torch.tensor([127.0, 2.5, -3.5, 0.5, 1.5, -0.5])  # d = 1: ties at every value but the first
    x[0, 32:40] = torch.arange(8) * 0.5 - 1.75
    x[2, 200] = -1.0  # row 2: one value in its seventh block, the other blocks zero
    out = run_kernel(op, x, codes)
    expected = reference(x, codes)
    assert not out[1].any()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@needs_kernel
def test_mixed_shards_merge_to_one_layout(op):
    """A fused q | k | v of Q4_K, Q4_K, Q6_K (Qwen2.5's layout) and of Q5_0, Q8_0 computes each part."""
    for types in (["Q4_K", "Q4_K", "Q6_K"], ["Q5_0", "Q8_0"], ["Q4_1", "Q8_0"], ["Q5_K", "Q6_K"], ["Q5_0", "Q4_0"]):
        parts = [make_tensor(t, 24, 256, seed=i).codes() for i, t in enumerate(types)]
        x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
        out = run_kernel(op, x, merge(parts))
        expected = torch.cat([reference(x, p) for p in parts], dim=1)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@needs_kernel
def test_bfloat16_activations(op):
    codes = make_tensor("Q4_K", 64, 256).codes()
    x = torch.randn(4, 256).bfloat16()
    out = run_kernel(op, x, codes)
    assert out.dtype == torch.bfloat16
    expected = reference(x, codes)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


class _Layer(torch.nn.Module):
    """The parts of a Linear the method reads."""

    def __init__(self, tensors: dict[str, GGUFTensor], bias: bool) -> None:
        super().__init__()
        rows = sum(t.shape[0] for t in tensors.values())
        cols = next(iter(tensors.values())).cols
        self.weight = torch.nn.Parameter(torch.empty(rows, cols), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(rows), requires_grad=False) if bias else None
        self.shards, offset = {}, 0
        for name, tensor in tensors.items():
            self.shards[name] = (offset, None)
            offset += tensor.shape[0]
        self.gguf_shards = dict(tensors)


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q8_0"])
def test_forced_fallback_matches_the_kernel(type_name):
    tensors = {"q": make_tensor(type_name, 48, 256, seed=1), "k": make_tensor(type_name, 16, 256, seed=2)}
    kernel_layer, fallback_layer = _Layer(tensors, True), _Layer(tensors, True)
    fallback_layer.bias = kernel_layer.bias
    GGUFQuantized().process_weights_after_loading(kernel_layer)
    GGUFQuantized(use_kernel=False).process_weights_after_loading(fallback_layer)
    assert kernel_layer.quantized_op is not None and kernel_layer.weight is None
    assert fallback_layer.quantized_op is None
    x = torch.randn(6, 256)
    fast = GGUFQuantized().apply(kernel_layer, x)
    slow = GGUFQuantized(use_kernel=False).apply(fallback_layer, x)
    # the kernel rounds activations to 8 bits per block of 32: about 0.4% of a block's largest value
    torch.testing.assert_close(fast, slow, rtol=0, atol=0.02 * slow.abs().max().item())
