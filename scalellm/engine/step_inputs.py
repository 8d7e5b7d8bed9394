"""Turning a SchedulerOutput into the tensors of one forward pass.

Chunks are reordered so one-token queries come first (the batched decode path), then the
multi-token chunks. Slots of a request's context come from its block table (one per KV cache
group, interleaved in block_ids; one group: table = block_ids):

    position p  ->  slot = table[p // block_size] * block_size + p % block_size

A chunk of up to `row_chunk_limit` tokens (layers/attention.py: with the C++ paged kernel, up to 512)
needs no attention of its own: its token at position p is a query row of its own over the keys
[0, p] of its request's table, as a one-token query is. When every chunk of a step is that short,
the whole step is laid out as one-token rows (num_decode_tokens = all tokens, no prefill spans), so
one kernel call attends for every token and the fused layers (models/fused_decode.py) take the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scalellm.engine.layers.attention import AttentionMetadata, PrefillSpan
from scalellm.engine.outputs import ScheduledChunk, SchedulerOutput


@dataclass
class StepInputs:
    token_ids: torch.Tensor
    """[T] the step's new tokens."""
    positions: torch.Tensor
    """[T] their positions."""
    attention: list[AttentionMetadata]
    """Per KV cache group (kv_cache/groups.py): its slots, block tables and window."""
    sample_chunks: list[ScheduledChunk]
    """Chunks that draw a token, in the order of sample_indices."""
    sample_indices: torch.Tensor
    """[S] index into the step's tokens of each sampling chunk's last token."""


def build_step_inputs(output: SchedulerOutput, block_size: int, group_windows: tuple[int | None, ...],
                      device: torch.device, decode_backend: str = "torch", row_chunk_limit: int = 1) -> StepInputs:
    """group_windows: per KV cache group, its sliding window or None; a chunk's block_ids interleave
    the groups' tables (entry row * num_groups + group). row_chunk_limit: see the module doc."""
    if all(c.num_new_tokens <= row_chunk_limit for c in output.chunks):
        row_chunks, prefills = list(output.chunks), []  # every token a one-query row
    else:
        row_chunks = [c for c in output.chunks if c.num_new_tokens == 1]
        prefills = [c for c in output.chunks if c.num_new_tokens > 1]
    ordered = row_chunks + prefills
    token_ids: list[int] = []
    positions: list[int] = []
    sample_chunks, sample_indices = [], []
    for chunk in ordered:
        start, end = chunk.start_position, chunk.start_position + chunk.num_new_tokens
        token_ids.extend(chunk.request.all_token_ids[start:end])
        positions.extend(range(start, end))
        if chunk.needs_sample:
            sample_chunks.append(chunk)
            sample_indices.append(len(token_ids) - 1)
    # The index arithmetic runs in numpy: a few microseconds an op against torch's 5-10, which at one
    # stream added up to 5% of a decode step. The results become tensors without a copy.
    positions_a = np.array(positions, dtype=np.int64)
    row_of_token = np.repeat(np.arange(len(ordered)), [c.num_new_tokens for c in ordered])
    all_tables = _block_table(ordered)  # [N, max_blocks * num_groups]
    num_groups = len(group_windows)
    num_row_tokens = sum(c.num_new_tokens for c in row_chunks)

    def metadata(group: int, window: int | None) -> AttentionMetadata:
        tables = all_tables[:, group::num_groups]  # [N, max_blocks]
        slot_mapping = _slots(tables, row_of_token, positions_a, block_size)
        meta = AttentionMetadata(slot_mapping=_tensor(slot_mapping, device), num_decode_tokens=num_row_tokens,
                                 block_size=block_size, decode_sliding_window=window or 0,
                                 decode_backend=decode_backend)
        if row_chunks:
            meta.decode_block_table, meta.decode_context_lens, meta.decode_mask = _decode_context(
                tables[row_of_token[:num_row_tokens]], positions_a[:num_row_tokens], block_size, window, device,
                with_mask=decode_backend == "torch")
        offset = num_row_tokens
        for row, chunk in enumerate(prefills, start=len(row_chunks)):
            meta.prefills.append(_prefill_span(chunk, tables, row, offset, block_size, window, device))
            offset += chunk.num_new_tokens
        return meta

    return StepInputs(
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=_tensor(positions_a, device),
        attention=[metadata(group, window) for group, window in enumerate(group_windows)],
        sample_chunks=sample_chunks,
        sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
    )


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _block_table(chunks: list[ScheduledChunk]) -> np.ndarray:
    width = max(len(c.block_ids) for c in chunks)
    return np.array([c.block_ids + [0] * (width - len(c.block_ids)) for c in chunks], dtype=np.int64)


def _slots(tables: np.ndarray, rows, positions: np.ndarray, block_size: int) -> np.ndarray:
    """tables [N, max_blocks], rows [L] (or one row for all), positions [L] -> slots [L]."""
    return tables[rows, positions // block_size] * block_size + positions % block_size


def _decode_context(tables: np.ndarray, positions: np.ndarray, block_size: int,
                    sliding_window: int | None, device: torch.device, with_mask: bool):
    """The block tables trimmed to the longest context, the context lengths, and (with_mask) the
    mask of real (and in-window) keys."""
    context_lens = positions + 1  # [B]
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    block_table = _tensor(tables[:, :num_blocks], device)
    if not with_mask:
        return block_table, _tensor(context_lens, device), None
    key_positions = np.arange(num_blocks * block_size)[None, :]  # [1, L]
    valid = key_positions < context_lens[:, None]  # [B, L]
    if sliding_window is not None:
        valid &= key_positions > (positions[:, None] - sliding_window)
    return block_table, _tensor(context_lens, device), _tensor(valid[:, None, None, :], device)


def _prefill_span(chunk: ScheduledChunk, tables: np.ndarray, row: int, token_start: int, block_size: int,
                  sliding_window: int | None, device: torch.device) -> PrefillSpan:
    start, num = chunk.start_position, chunk.num_new_tokens
    context_len = start + num
    # Within a window, keys before the first query's window are never read (their blocks may be gone).
    first_key = max(0, start - sliding_window + 1) if sliding_window is not None else 0
    key_positions = np.arange(first_key, context_len)
    kv_slots = _slots(tables, row, key_positions, block_size)
    mask = None
    if start > 0 or sliding_window is not None:
        query_positions = np.arange(start, context_len)[:, None]  # [n, 1]
        mask = key_positions[None, :] <= query_positions  # [n, L]
        if sliding_window is not None:
            mask &= key_positions[None, :] > (query_positions - sliding_window)
        mask = _tensor(mask, device)
    return PrefillSpan(token_start=token_start, num_tokens=num, kv_slots=_tensor(kv_slots, device), mask=mask)
