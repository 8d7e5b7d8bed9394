"""The fused C++ W8A8 linear op: bit for bit the torch path, for every shape, dtype and batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalellm.engine.layers.kernels import kernel_load_error, load_int8_linear, load_int8_linear_path
from scalellm.engine.quantization.gguf import kernel_isa
from scalellm.engine.quantization.int8 import Int8Dynamic, int8_linear, pack_for_vnni, quantize_rows


@pytest.fixture(scope="module")
def native():
    """The op as built for this CPU (what the quantization method calls)."""
    fused = load_int8_linear()
    if fused is None:
        pytest.skip(f"the C++ int8 kernel cannot be built here: {kernel_load_error('int8_linear')}")
    return fused


@pytest.fixture(scope="module", params=["native", "avx2", "portable"])
def op(request, native):
    """The native op, and each path the native build does not take, built alone."""
    if request.param == "native":
        return native
    built = {"avx512-vnni": "vnni", "avx2": "avx2", None: "portable"}[kernel_isa()]
    if request.param == built or (request.param == "avx2" and built == "portable"):
        pytest.skip(f"the native build is the {built} path here")
    path = load_int8_linear_path(request.param)
    assert path is not None, f"the {request.param} build failed: {kernel_load_error('int8_linear_' + request.param)}"
    return path


# (N, K): the default model's projections, plus ragged sizes that exercise every padding path.
SHAPES = [(960, 576), (576, 1536), (37, 19), (16, 4), (100, 576), (3, 7)]


@pytest.mark.parametrize("num_out,num_in", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_equals_the_torch_path_exactly(op, num_out, num_in, dtype):
    generator = torch.Generator().manual_seed(num_out * 1000 + num_in)
    weight_q, weight_scales = quantize_rows(torch.randn(num_out, num_in, generator=generator))
    packed, compensation = pack_for_vnni(weight_q)
    for bias in (None, torch.randn(num_out, generator=generator)):
        for num_tokens in (1, 2, 3, 4, 5, 9, 33):
            x = (torch.randn(num_tokens, num_in, generator=generator) * 3).to(dtype)
            expected = int8_linear(x, weight_q.t(), weight_scales, bias)
            got = op(x, packed, compensation, weight_scales, bias, num_out)
            assert got.dtype == dtype
            assert torch.equal(got, expected), (num_tokens, bias is not None)


def test_a_tokens_output_does_not_depend_on_its_batch(op):
    generator = torch.Generator().manual_seed(7)
    weight_q, weight_scales = quantize_rows(torch.randn(200, 64, generator=generator))
    packed, compensation = pack_for_vnni(weight_q)
    batch = torch.randn(13, 64, generator=generator)
    together = op(batch, packed, compensation, weight_scales, None, 200)
    for row in range(13):
        alone = op(batch[row:row + 1].clone(), packed, compensation, weight_scales, None, 200)
        assert torch.equal(alone[0], together[row])


def test_packed_layout_holds_each_weight_once_at_its_place():
    weight_q = torch.arange(20 * 6, dtype=torch.int32).remainder(251).sub(125).to(torch.int8).view(20, 6)
    packed, compensation = pack_for_vnni(weight_q)
    assert packed.shape == (2, 2, 16, 4)
    assert packed[1, 1, 3, 1] == weight_q[16 + 3, 4 + 1]
    assert packed[1, 1, 3, 2] == 0 and packed[1, 0, 4, 0] == 0  # padding: k = 6, n = 20
    assert torch.equal(compensation[:20], weight_q.sum(dim=1, dtype=torch.int32) * 128)
    assert not compensation[20:].any()


def test_the_quantization_method_uses_the_fused_op_for_every_input_dtype(native):
    layer = nn.Module()
    weight = torch.randn(48, 32)
    layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    layer.bias = nn.Parameter(torch.randn(48), requires_grad=False)
    method = Int8Dynamic()
    method.process_weights_after_loading(layer)
    assert layer.weight is None and hasattr(layer, "weight_packed") and not hasattr(layer, "weight_q")
    weight_q, weight_scales = quantize_rows(weight)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(5, 32).to(dtype)
        out = method.apply(layer, x)
        assert out.dtype == dtype
        assert torch.equal(out, int8_linear(x, weight_q.t(), weight_scales, layer.bias))
