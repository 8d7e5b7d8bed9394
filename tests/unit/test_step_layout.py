"""A step's attention is the same whichever way step_inputs lays it out: with the C++ kernel short
prompt chunks become one-query rows beside the decodes; otherwise they are prefill spans (SDPA)."""

from __future__ import annotations

import pytest
import torch

from scalellm.engine.layers import attention
from scalellm.engine.layers.attention import PAGED_ROW_MAX_TOKENS, paged_attention, row_chunk_limit
from scalellm.engine.layers.kernels import load_paged_attention, paged_attention_load_error
from scalellm.engine.outputs import ScheduledChunk, SchedulerOutput
from scalellm.engine.request import Request
from scalellm.engine.step_inputs import build_step_inputs
from scalellm.protocol.types import SamplingParams

BLOCK_SIZE, HEADS, KV_HEADS, HEAD_DIM, NUM_BLOCKS = 4, 6, 2, 64, 64

pytestmark = pytest.mark.skipif(load_paged_attention() is None,
                                reason=f"the paged kernel cannot be built here: {paged_attention_load_error()}")


def _step(gen: torch.Generator) -> SchedulerOutput:
    """Two decodes, a prompt's first chunk and a chunk after a cached prefix, each over its own
    shuffled blocks."""
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    chunks = []
    for index, (start, num) in enumerate([(9, 1), (30, 1), (0, 20), (16, 11)]):
        length = start + num
        request = Request(f"r{index}", list(range(3, 3 + length)), SamplingParams(), max_tokens=4, eos_token_id=None)
        blocks = [free.pop() for _ in range(-(-length // BLOCK_SIZE))]
        chunks.append(ScheduledChunk(request, start, num, blocks))
    return SchedulerOutput(chunks=chunks)


def _attend(step: SchedulerOutput, backend: str, limit: int, window: int | None, caches, q, k, v):
    inputs = build_step_inputs(step, BLOCK_SIZE, (window,), torch.device("cpu"), backend, limit)
    k_cache, v_cache = (c.clone() for c in caches)
    return paged_attention(q, k, v, (k_cache, v_cache), inputs.attention[0]), inputs.attention[0]


@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
@pytest.mark.parametrize("row_limit", [PAGED_ROW_MAX_TOKENS["avx2"], 12], ids=["all-rows", "one-span"])
def test_rows_and_spans_attend_alike(window, row_limit):
    gen = torch.Generator().manual_seed(0)
    step = _step(gen)
    num_tokens = sum(c.num_new_tokens for c in step.chunks)
    caches = [torch.randn(NUM_BLOCKS * BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2)]
    q = torch.randn(num_tokens, HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(num_tokens, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))

    expected, spans = _attend(step, "torch", row_chunk_limit("torch", HEAD_DIM), window, caches, q, k, v)
    got, rows = _attend(step, "cpp", row_limit, window, caches, q, k, v)

    assert spans.num_decode_tokens == 2 and len(spans.prefills) == 2
    if row_limit >= 20:  # every chunk is short: one-query rows only, which the fused layers take
        assert rows.num_decode_tokens == num_tokens and not rows.prefills
    else:  # a chunk is too long: the usual layout, decodes as rows and both prompt chunks as spans
        assert rows.num_decode_tokens == 2 and len(rows.prefills) == 2
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_rows_only_where_the_kernel_keeps_the_queries_in_registers(monkeypatch):
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert row_chunk_limit("cpp", 64) == row_chunk_limit("cpp", 128) == PAGED_ROW_MAX_TOKENS["avx512"]
    assert row_chunk_limit("cpp", 256) == 1  # the generic loop: SDPA is faster for prompts there
    assert row_chunk_limit("torch", 64) == 1
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert row_chunk_limit("cpp", 64) == row_chunk_limit("cpp", 128) == PAGED_ROW_MAX_TOKENS["avx2"]
    assert row_chunk_limit("cpp", 80) == 1
    monkeypatch.setattr(attention, "cpu_flags", lambda: frozenset({"sse4_2"}))
    assert row_chunk_limit("cpp", 64) == 1  # neither: the kernel has only its generic loop
