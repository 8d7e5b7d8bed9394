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
    positions_t = torch.tensor(positions, dtype=torch.long)
    row_of_token = torch.repeat_interleave(
        torch.arange(len(ordered)), torch.tensor([c.num_new_tokens for c in ordered]))
    all_tables = _block_table(ordered, block_size)  # [N, max_blocks * num_groups]
    num_groups = len(group_windows)
    num_row_tokens = sum(c.num_new_tokens for c in row_chunks)

    def metadata(group: int, window: int | None) -> AttentionMetadata:
        tables = all_tables[:, group::num_groups]  # [N, max_blocks]
        slot_mapping = _slots(tables[row_of_token], positions_t.unsqueeze(1), block_size).squeeze(1)
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(device), num_decode_tokens=num_row_tokens,
                                 block_size=block_size, decode_sliding_window=window or 0,
                                 decode_backend=decode_backend)
        if row_chunks:
            meta.decode_block_table, meta.decode_context_lens, meta.decode_mask = _decode_context(
                tables[row_of_token[:num_row_tokens]], positions_t[:num_row_tokens], block_size, window, device,
                with_mask=decode_backend == "torch")
        offset = num_row_tokens
        for row, chunk in enumerate(prefills, start=len(row_chunks)):
            meta.prefills.append(_prefill_span(chunk, tables[row], offset, block_size, window, device))
            offset += chunk.num_new_tokens
        return meta

    return StepInputs(
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=positions_t.to(device),
        attention=[metadata(group, window) for group, window in enumerate(group_windows)],
        sample_chunks=sample_chunks,
        sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=device),
    )


def _block_table(chunks: list[ScheduledChunk], block_size: int) -> torch.Tensor:
    width = max(len(c.block_ids) for c in chunks)
    return torch.tensor([c.block_ids + [0] * (width - len(c.block_ids)) for c in chunks], dtype=torch.long)


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """tables [N, max_blocks], positions [N, L] -> slots [N, L]."""
    return torch.gather(tables, 1, positions // block_size) * block_size + positions % block_size


def _decode_context(tables: torch.Tensor, positions: torch.Tensor, block_size: int,
                    sliding_window: int | None, device: torch.device, with_mask: bool):
    """The block tables trimmed to the longest context, the context lengths, and (with_mask) the
    mask of real (and in-window) keys."""
    context_lens = positions + 1  # [B]
    num_blocks = (int(context_lens.max()) + block_size - 1) // block_size
    block_table = tables[:, :num_blocks].contiguous().to(device)
    if not with_mask:
        return block_table, context_lens.to(device), None
    key_positions = torch.arange(num_blocks * block_size).expand(len(positions), -1)  # [B, L]
    valid = key_positions < context_lens.unsqueeze(1)
    if sliding_window is not None:
        valid &= key_positions > (positions.unsqueeze(1) - sliding_window)
    return block_table, context_lens.to(device), valid[:, None, None, :].to(device)


def _prefill_span(chunk: ScheduledChunk, table: torch.Tensor, token_start: int, block_size: int,
                  sliding_window: int | None, device: torch.device) -> PrefillSpan:
    start, num = chunk.start_position, chunk.num_new_tokens
    context_len = start + num
    # Within a window, keys before the first query's window are never read (their blocks may be gone).
    first_key = max(0, start - sliding_window + 1) if sliding_window is not None else 0
    key_positions = torch.arange(first_key, context_len)
    kv_slots = _slots(table.unsqueeze(0), key_positions.unsqueeze(0), block_size)[0]
    mask = None
    if start > 0 or sliding_window is not None:
        query_positions = torch.arange(start, context_len).unsqueeze(1)  # [n, 1]
        mask = key_positions.unsqueeze(0) <= query_positions  # [n, L]
        if sliding_window is not None:
            mask &= key_positions.unsqueeze(0) > (query_positions - sliding_window)
        mask = mask.to(device)
    return PrefillSpan(token_start=token_start, num_tokens=num, kv_slots=kv_slots.to(device), mask=mask)
