"""Attention over the paged KV cache, in plain torch (scaled_dot_product_attention on gathered blocks).

The KV cache of one layer is two tensors [num_slots, num_kv_heads, head_dim]; slot = block_id *
block_size + offset. A step's tokens are laid out as

    [ d0 d1 ... d(B-1) | p0 p0 p0 ... | p1 p1 ... ]
      one-token queries   prefill chunks (several tokens each)

Every layer first writes the step's new K/V into their slots, then attends, so a request may read
KV written in the same step by another (shared prefix blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSpan:
    """A multi-token query: tokens [token_start, token_start + num_tokens) of the step."""

    token_start: int
    num_tokens: int
    kv_slots: torch.Tensor
    """[L] slots of the request's whole context so far (L = start_position + num_tokens)."""
    mask: torch.Tensor | None
    """[num_tokens, L] bool (True = attend), or None when plain causal from position 0 applies."""


@dataclass
class AttentionMetadata:
    """Per-step index tensors, built once by the model runner and read by every layer."""

    slot_mapping: torch.Tensor
    """[T] the slot where each new token's K/V is written."""
    num_decode_tokens: int
    """The first num_decode_tokens tokens are one-token queries."""
    block_size: int = 16
    decode_block_table: torch.Tensor | None = None
    """[B, max_blocks] the blocks of each one-token query's context, padded with block 0."""
    decode_mask: torch.Tensor | None = None
    """[B, 1, 1, max_blocks * block_size] bool, False on padding (and outside a sliding window)."""
    prefills: list[PrefillSpan] = field(default_factory=list)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's K/V [T, KH, D] at their slots."""
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, D], k/v [T, KH, D] for the step's tokens -> output [T, H, D]."""
    k_cache, v_cache = kv_cache
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    outputs = []
    if meta.num_decode_tokens:
        outputs.append(_decode_attention(q[:meta.num_decode_tokens], k_cache, v_cache, meta))
    for span in meta.prefills:
        q_span = q[span.token_start:span.token_start + span.num_tokens]
        outputs.append(_prefill_attention(q_span, k_cache, v_cache, span))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor:
    # A one-token query needs no causal mask, so the query heads that share a KV head are laid out
    # as that head's "sequence": GQA without repeating K/V.
    # Whole blocks are gathered (contiguous copies of block_size * KH * D), not single slots.
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    keys = _gather_blocks(k_cache, meta.decode_block_table, meta.block_size)  # [B, KH, L, D]
    values = _gather_blocks(v_cache, meta.decode_block_table, meta.block_size)
    q = q.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KH, G, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask)
    return out.reshape(num_tokens, num_heads, head_dim)


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [slots, KH, D], block_table [B, NB] -> [B, KH, NB * block_size, D] (a strided view of a copy)."""
    num_rows, num_blocks = block_table.shape
    blocks = cache.view(-1, block_size, *cache.shape[1:])[block_table]  # [B, NB, bs, KH, D]
    return blocks.view(num_rows, num_blocks * block_size, *cache.shape[1:]).transpose(1, 2)


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       span: PrefillSpan) -> torch.Tensor:
    keys = k_cache[span.kv_slots].transpose(0, 1).unsqueeze(0)  # [1, KH, L, D]
    values = v_cache[span.kv_slots].transpose(0, 1).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=span.mask,
                                         is_causal=span.mask is None, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, H, D]
