"""The C++ paged decode-attention kernel against the torch decode path, on shuffled block tables."""

from __future__ import annotations

import pytest
import torch

from scalellm.config import EngineConfig
from scalellm.engine.layers.attention import AttentionMetadata, DECODE_BACKENDS, resolve_decode_backend
from scalellm.cpu import cpu_flags
from scalellm.engine.layers.kernels import (kernel_load_error, load_paged_attention, load_paged_attention_avx2,
                                            paged_attention_load_error)

HEAD_DIM = 64


@pytest.fixture(scope="module")
def kernel():
    op = load_paged_attention()
    if op is None:
        pytest.skip(f"the C++ paged attention kernel cannot be built here: {paged_attention_load_error()}")
    return op


@pytest.fixture(scope="module", params=["native", "avx2"])
def op(request, kernel):
    """The op as built for this CPU, and on an AVX-512 CPU its AVX2 path built alone."""
    if request.param == "native":
        return kernel
    flags = cpu_flags()
    if not {"avx2", "fma"} <= flags or not {"avx512f", "avx512bw"} <= flags:
        pytest.skip("the native build is the AVX2 path here, or the CPU cannot run it")
    path = load_paged_attention_avx2()
    assert path is not None, f"the AVX2 build failed: {kernel_load_error('paged_attention_avx2')}"
    return path


def _random_batch(num_rows: int, num_heads: int, num_kv_heads: int, block_size: int,
                  dtype: torch.dtype, seed: int, head_dim: int = HEAD_DIM, first_context: int = 1):
    """q [B, H, D], caches [slots, KH, D], a shuffled block table [B, NB] and context lengths [B]."""
    gen = torch.Generator().manual_seed(seed)
    context_lens = torch.randint(1, 301, (num_rows,), generator=gen)
    context_lens[0] = first_context  # by default the shortest context always occurs
    max_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    num_cache_blocks = num_rows * max_blocks + 3
    # Every row gets distinct, non-contiguous blocks; padding entries point at block 0.
    blocks = torch.randperm(num_cache_blocks, generator=gen)[:num_rows * max_blocks].view(num_rows, max_blocks)
    used = (torch.arange(max_blocks) * block_size).unsqueeze(0) < context_lens.unsqueeze(1)
    block_table = torch.where(used, blocks, torch.zeros_like(blocks))
    shape = (num_cache_blocks * block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(num_rows, num_heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, block_table, context_lens


def _torch_reference(q, k_cache, v_cache, block_table, context_lens, block_size, window):
    """The engine's torch decode path, with the mask step_inputs builds."""
    key_positions = torch.arange(block_table.shape[1] * block_size).unsqueeze(0)  # [1, L]
    valid = key_positions < context_lens.unsqueeze(1)
    if window:
        valid &= key_positions >= (context_lens.unsqueeze(1) - window)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=len(q),
                             block_size=block_size, decode_block_table=block_table,
                             decode_mask=valid[:, None, None, :])
    return DECODE_BACKENDS["torch"](q, k_cache, v_cache, meta)


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("window", [0, 37], ids=["full", "window37"])
def test_matches_torch_path(op, dtype, num_heads, num_kv_heads, block_size, window):
    # One row is split by KV head over the threads; 5 and 33 rows are whole-row tasks on the AVX2 path
    # with up to two threads, and 33 with up to 16.
    for seed, num_rows in enumerate((1, 5, 33)):
        q, k_cache, v_cache, block_table, context_lens = _random_batch(
            num_rows, num_heads, num_kv_heads, block_size, dtype, seed)
        expected = _torch_reference(q, k_cache, v_cache, block_table, context_lens, block_size, window)
        out = op(q, k_cache, v_cache, block_table, context_lens, block_size, HEAD_DIM ** -0.5, window)
        assert out.dtype == dtype and out.shape == q.shape
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("window", [0, 37], ids=["full", "window37"])
def test_rows_split_over_the_threads_merge_to_one_softmax(op, threads, window):
    """With fewer rows than two a thread, the AVX2 path splits each row's context over the threads and
    merges the parts' softmax sums; parts may be empty (a context of 1 or 2 positions in 3 parts)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for first_context in (1, 2, 5, 64, 300, 1000):
            for seed, num_rows in enumerate((1, 2, 3)):
                for dtype in (torch.float32, torch.bfloat16):
                    q, k_cache, v_cache, block_table, context_lens = _random_batch(
                        num_rows, 9, 3, 16, dtype, seed, first_context=first_context)
                    expected = _torch_reference(q, k_cache, v_cache, block_table, context_lens, 16, window)
                    out = op(q, k_cache, v_cache, block_table, context_lens, 16, HEAD_DIM ** -0.5, window)
                    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (12, 2), (14, 2)], ids=["mha", "gqa6", "gqa7"])
def test_head_dim_128_and_groups_past_four(op, dtype, num_heads, num_kv_heads):
    for seed, num_rows in enumerate((1, 33)):
        q, k_cache, v_cache, block_table, context_lens = _random_batch(
            num_rows, num_heads, num_kv_heads, 16, dtype, seed, head_dim=128)
        expected = _torch_reference(q, k_cache, v_cache, block_table, context_lens, 16, 0)
        out = op(q, k_cache, v_cache, block_table, context_lens, 16, 128 ** -0.5, 0)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("head_dim", [32, 64, 80, 256])
def test_int32_indices_and_other_head_dims(op, head_dim):
    q, k_cache, v_cache, block_table, context_lens = _random_batch(
        7, 6, 2, 16, torch.float32, seed=11, head_dim=head_dim)
    expected = _torch_reference(q, k_cache, v_cache, block_table, context_lens, 16, 0)
    out = op(q, k_cache, v_cache, block_table.int(), context_lens.int(), 16, head_dim ** -0.5, 0)
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_bfloat16_cache_under_float32_queries_is_read_widened(op, head_dim):
    """A bfloat16 cache under float32 queries gives bit for bit what the same values widened to a float32
    cache give (widening is exact; the arithmetic is the float32 path's), on the register paths and the
    generic one (head_dim 80)."""
    for seed, num_rows in enumerate((1, 5, 33)):
        q, k_cache, v_cache, block_table, context_lens = _random_batch(
            num_rows, 6, 2, 16, torch.float32, seed, head_dim=head_dim)
        k16, v16 = k_cache.bfloat16(), v_cache.bfloat16()
        out = op(q, k16, v16, block_table, context_lens, 16, head_dim ** -0.5, 0)
        assert out.dtype == torch.float32
        assert torch.equal(out, op(q, k16.float(), v16.float(), block_table, context_lens, 16, head_dim ** -0.5, 0))


def test_cache_dtypes_other_than_the_queries_or_bfloat16_under_float32_are_rejected(kernel):
    q, k_cache, v_cache, block_table, context_lens = _random_batch(3, 4, 2, 4, torch.float32, seed=3)
    for q_dtype, cache_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float16)):
        with pytest.raises(RuntimeError, match="dtype"):
            kernel(q.to(q_dtype), k_cache.to(cache_dtype), v_cache.to(cache_dtype), block_table, context_lens, 4,
                   0.125, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel(q, k_cache.bfloat16(), v_cache, block_table, context_lens, 4, 0.125, 0)


def test_rejects_out_of_range_inputs(kernel):
    q, k_cache, v_cache, block_table, context_lens = _random_batch(3, 4, 2, 4, torch.float32, seed=3)
    too_long = context_lens.clone()
    too_long[1] = block_table.shape[1] * 4 + 1
    with pytest.raises(RuntimeError, match="context_lens"):
        kernel(q, k_cache, v_cache, block_table, too_long, 4, 0.125, 0)
    bad_table = block_table.clone()
    bad_table[0, 0] = k_cache.shape[0]  # a block id past the cache
    with pytest.raises(RuntimeError, match="not a block of the cache"):
        kernel(q, k_cache, v_cache, bad_table, context_lens, 4, 0.125, 0)


def test_backend_resolution(kernel):
    cpu = torch.device("cpu")
    assert resolve_decode_backend("auto", cpu, torch.float32) == "cpp"
    assert resolve_decode_backend("auto", cpu, torch.float16) == "torch"
    assert resolve_decode_backend("torch", cpu, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        resolve_decode_backend("cpp", cpu, torch.float16)


def test_config_validates_attention_backend():
    assert EngineConfig(attention_backend="cpp").attention_backend == "cpp"
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_loader_reports_a_missing_compiler(monkeypatch, caplog):
    from scalellm.engine.layers.kernels import _build
    monkeypatch.setenv("CXX", "no-such-compiler")
    op, reason = _build("paged_attention")  # the build itself, not the per-process record of it
    assert op is None and "no C++ compiler" in reason
    assert "torch path" in caplog.text
