"""The fused norm, rotary and SwiGLU ops (float32 and bfloat16) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalellm.engine.layers.kernels import FUSED_DTYPES, kernel_load_error, load_norm_rotary
from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.norm import RMSNorm
from scalellm.engine.layers.rotary import _rotate_half


@pytest.fixture(scope="module")
def ops():
    fused = load_norm_rotary()
    if fused is None:
        pytest.skip(f"the C++ norm/rotary kernel cannot be built here: {kernel_load_error('norm_rotary')}")
    return fused


# How far a value may sit from torch's where only a float sum's order or the exponential differs:
# one bfloat16 step, or a few float32 ulps.
STEP = {torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}


def _torch_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 576), (9, 576), (33, 100), (3, 17)])
def test_add_rms_norm_matches_the_torch_ops(ops, num_tokens, hidden, dtype):
    add_rms_norm = ops.add_rms_norm
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    x, residual = (torch.randn(num_tokens, hidden, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(hidden, generator=gen).to(dtype)
    normed, total = add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(total, x + residual)  # the residual add rounds exactly as torch's
    expected = _torch_norm(x + residual, weight, 1e-5)
    # Only the float sum of squares may be ordered otherwise.
    assert torch.allclose(normed.float(), expected.float(), rtol=STEP[dtype], atol=0)
    if dtype == torch.bfloat16:
        assert (normed == expected).float().mean() > 0.99
    alone, same = add_rms_norm(x, None, weight, 1e-5)
    assert same is x or torch.equal(same, x)
    assert torch.allclose(alone.float(), _torch_norm(x, weight, 1e-5).float(), rtol=STEP[dtype], atol=0)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("num_tokens,num_heads,head_dim", [(1, 12, 64), (5, 12, 64), (3, 4, 128), (2, 3, 40)])
def test_rotary_in_place_equals_the_torch_ops_on_a_strided_view(ops, num_tokens, num_heads, head_dim, dtype):
    rotary_ = ops.rotary_
    gen = torch.Generator().manual_seed(num_heads * head_dim)
    qkv = torch.randn(num_tokens, (num_heads + 2) * head_dim, generator=gen).to(dtype)
    untouched = qkv[:, num_heads * head_dim:].clone()
    qk = qkv[:, :num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    cos, sin = (torch.randn(num_tokens, 1, head_dim, generator=gen).to(dtype) for _ in range(2))
    expected = qk * cos + _rotate_half(qk) * sin
    rotary_(qk, cos, sin)
    assert torch.equal(qk, expected)
    assert torch.equal(qkv[:, num_heads * head_dim:], untouched)


def test_rms_norm_module_returns_the_residual_stream_in_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(64, 1e-6, dtype)
        norm.load(torch.linspace(0.5, 1.5, 64))
        x, residual = torch.randn(4, 64).to(dtype), torch.randn(4, 64).to(dtype)
        normed, total = norm(x, residual)
        assert torch.equal(total, x + residual)
        assert torch.allclose(normed.float(), _torch_norm(x + residual, norm.weight, 1e-6).float(), rtol=2 ** -7)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("num_tokens,intermediate", [(1, 1536), (7, 1536), (3, 20)])
def test_silu_and_mul_equals_the_torch_ops(ops, num_tokens, intermediate, dtype):
    silu_and_mul = ops.silu_and_mul
    gen = torch.Generator().manual_seed(intermediate + num_tokens)
    x = (torch.randn(num_tokens, 2 * intermediate, generator=gen) * 4).to(dtype)
    x[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, float("inf"), float("-inf")])  # both halves' edges
    gate, up = x.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    got = silu_and_mul(x)
    same = (got == expected) | (got.isnan() & expected.isnan())
    # Its exponential is not torch's: a value may sit one bf16 step (a few float ulps) away.
    assert same.float().mean() > (0.999 if dtype == torch.bfloat16 else 0.9)
    assert torch.allclose(got[~same].float(), expected[~same].float(), rtol=STEP[dtype], atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gated_mlp_uses_the_fused_op_in_the_dtypes_it_takes(ops, dtype):
    mlp = GatedMLP(16, 24, LayerOptions(dtype=dtype))
    assert (mlp.fused_silu_and_mul is not None) == (dtype in FUSED_DTYPES)
