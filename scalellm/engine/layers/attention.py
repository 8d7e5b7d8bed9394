"""Attention over the paged KV cache: scaled_dot_product_attention on gathered blocks, or for
one-token queries on the CPU a fused C++ kernel that reads the blocks in place (kernels/).

The KV cache of one layer is two tensors [num_slots, num_kv_heads, head_dim]; slot = block_id *
block_size + offset. It is in the activations' dtype, or narrower (device.resolve_kv_dtype): the new
K/V are rounded to it as they are written, and read back widened. A step's tokens are laid out as

    [ d0 d1 ... d(B-1) | p0 p0 p0 ... | p1 p1 ... ]
      one-token queries   prefill chunks (several tokens each)

(with the C++ kernel, short chunks are laid out as rows of one-token queries too, and a step of only
those has no prefill span: row_chunk_limit, step_inputs.py).

Every layer first writes the step's new K/V into their slots, then attends, so a request may read
KV written in the same step by another (shared prefix blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from scalellm.cpu import cpu_flags


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
    """The first num_decode_tokens tokens attend as one query row each (the decode path): one-token
    queries, and with the "cpp" backend the tokens of short multi-token chunks too, each over the keys
    up to its own position (row_chunk_limit)."""
    block_size: int = 16
    decode_block_table: torch.Tensor | None = None
    """[B, max_blocks] the blocks of each row's context, padded with block 0."""
    decode_mask: torch.Tensor | None = None
    """[B, 1, 1, max_blocks * block_size] bool, False on padding (and outside a sliding window);
    built for the "torch" decode backend only."""
    decode_context_lens: torch.Tensor | None = None
    """[B] long, the context length of each row (its position + 1)."""
    decode_sliding_window: int = 0
    """Keys a row sees, counting itself; <= 0: the whole context."""
    decode_backend: str = "torch"
    """How one-token queries attend: a key of DECODE_BACKENDS."""
    prefills: list[PrefillSpan] = field(default_factory=list)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the step's K/V [T, KH, D] at their slots (rounded to the cache's dtype where it is narrower)."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
    """q [T, H, D], k/v [T, KH, D] for the step's tokens -> output [T, H, D]."""
    k_cache, v_cache = kv_cache
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    outputs = []
    if meta.num_decode_tokens:
        decode = DECODE_BACKENDS[meta.decode_backend]
        outputs.append(decode(q[:meta.num_decode_tokens], k_cache, v_cache, meta))
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
    keys = _gather_blocks(k_cache, meta.decode_block_table, meta.block_size).to(q.dtype)  # [B, KH, L, D]
    values = _gather_blocks(v_cache, meta.decode_block_table, meta.block_size).to(q.dtype)
    q = q.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KH, G, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask)
    return out.reshape(num_tokens, num_heads, head_dim)


def _decode_attention_cpp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
    # The fused kernel reads K/V in place from the cache blocks; the op was registered by
    # load_paged_attention() when the model runner resolved the backend.
    return torch.ops.scalellm.paged_decode_attention(
        q, k_cache, v_cache, meta.decode_block_table, meta.decode_context_lens, meta.block_size,
        q.shape[-1] ** -0.5, meta.decode_sliding_window)  # [B, H, D]


DECODE_BACKENDS = {"torch": _decode_attention, "cpp": _decode_attention_cpp}
"""Decode attention implementations, by AttentionMetadata.decode_backend."""


PAGED_ROW_MAX_TOKENS = {"avx512": 512, "avx2": 128}
"""The longest chunk whose tokens the C++ kernel attends as one-query rows, by its register path (see
row_chunk_limit)."""


def row_chunk_limit(decode_backend: str, head_dim: int) -> int:
    """The longest chunk whose tokens attend as one-query rows of the decode path, each over the keys
    up to its own position (step_inputs.py), rather than as a prefill span through SDPA.

    One token, except with the C++ kernel on its register paths (head_dim 64 or 128, on a CPU with
    AVX-512 or AVX2 and FMA): there PAGED_ROW_MAX_TOKENS of the path. A row costs its context, so a
    chunk of n tokens costs about n^2 / 2 key visits, and SDPA's blocked loop, which reads each key
    once for many queries, wins past some length. On a 2-core AVX-512 CPU in bfloat16 the kernel took
    196 us at 105 tokens and 4.3 ms at 512 (SmolLM2: 9 heads over 3 KV heads, head_dim 64) against
    SDPA's 337 us and 4.6 ms, and 692 us and 9.9 ms against 1,120 us and 10.5 ms (Qwen2.5-1.5B: 12
    over 2, head_dim 128). On a 2-core AVX2 CPU in float32 (SmolLM2) it took 423 us at 105 tokens
    against SDPA's 530, 2.1 against 1.8 ms at 256 and 8.1 against 6.5 ms at 512. Other head dims take
    the generic loop (Gemma 3's 256: 726 against SDPA's 430 us at 105 tokens), where a test serving
    an 8,000-token prompt of Qwen2.5-0.5B (test_real_models.py) was still in its 512-token row chunks
    after 3.5 minutes, and took 2.9 minutes in all with the chunks through SDPA.
    """
    if decode_backend != "cpp" or head_dim not in (64, 128):
        return 1
    flags = cpu_flags()
    if {"avx512f", "avx512bw"} <= flags:
        return PAGED_ROW_MAX_TOKENS["avx512"]
    if {"avx2", "fma"} <= flags:
        return PAGED_ROW_MAX_TOKENS["avx2"]
    return 1


def resolve_decode_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """EngineConfig.attention_backend -> a DECODE_BACKENDS key; compiles the C++ kernel if needed.

    "auto" is "cpp" when the kernel applies (CPU, float32 or bfloat16) and builds, else "torch";
    "cpp" raises ValueError with the reason when it cannot be used.
    """
    if requested == "torch":
        return "torch"
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        if requested == "cpp":
            raise ValueError(f"attention_backend='cpp' needs a CPU device and float32 or bfloat16, got "
                             f"{device.type} and {dtype}; use attention_backend='torch' or 'auto'")
        return "torch"
    from scalellm.engine.layers.kernels import load_paged_attention, paged_attention_load_error
    if load_paged_attention() is not None:
        return "cpp"
    if requested == "cpp":
        raise ValueError(f"attention_backend='cpp' but the C++ kernel cannot be built "
                         f"({paged_attention_load_error()}); use attention_backend='torch' or 'auto'")
    return "torch"


def _gather_blocks(cache: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """cache [slots, KH, D], block_table [B, NB] -> [B, KH, NB * block_size, D] (a strided view of a copy)."""
    num_rows, num_blocks = block_table.shape
    blocks = cache.view(-1, block_size, *cache.shape[1:])[block_table]  # [B, NB, bs, KH, D]
    return blocks.view(num_rows, num_blocks * block_size, *cache.shape[1:]).transpose(1, 2)


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       span: PrefillSpan) -> torch.Tensor:
    keys = k_cache[span.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KH, L, D]
    values = v_cache[span.kv_slots].to(q.dtype).transpose(0, 1).unsqueeze(0)
    q = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=span.mask,
                                         is_causal=span.mask is None, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, H, D]
