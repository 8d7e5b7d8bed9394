"""KV cache groups: Gemma 3's layer grouping, and sliding groups releasing blocks outside their window."""

from __future__ import annotations

from scalellm.engine.kv_cache.groups import kv_groups, layer_slots
from scalellm.engine.kv_cache.manager import KVCacheManager
from scalellm.engine.loader.gemma3_config import default_layer_types
from scalellm.engine.loader.model_config import ModelConfig
from scalellm.engine.request import Request
from scalellm.protocol.types import SamplingParams


def gemma_like(num_layers: int = 18, window: int | None = 512) -> ModelConfig:
    return ModelConfig(architecture="gemma3", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=num_layers,
                       num_heads=1, num_kv_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
                       max_position_embeddings=1024, tie_word_embeddings=True, sliding_window=window,
                       layer_types=default_layer_types(num_layers))


def test_gemma_layers_split_into_equal_groups_of_one_kind():
    groups = kv_groups(gemma_like(18))
    assert [g.layers for g in groups] == [(5, 11, 17), (0, 1, 2), (3, 4, 6), (7, 8, 9), (10, 12, 13), (14, 15, 16)]
    assert [g.sliding_window for g in groups] == [None] + [512] * 5
    group_of, pair_of = layer_slots(groups)
    assert (group_of[11], pair_of[11]) == (0, 1) and (group_of[4], pair_of[4]) == (2, 1)
    assert len(kv_groups(gemma_like(26))) == 13  # 4 full, 22 sliding: groups of 2
    assert [g.layers for g in kv_groups(gemma_like(18, window=None))] == [tuple(range(18))]


def run_decode(manager: KVCacheManager, prompt_len: int, num_steps: int) -> tuple[Request, list[int]]:
    """Prefill in one chunk, then decode one token a step; returns the request and blocks held per step."""
    request = Request("r", list(range(prompt_len)), SamplingParams(), num_steps + 1)
    assert manager.allocate_slots(request, prompt_len)
    request.num_computed_tokens = prompt_len
    held = []
    for step in range(num_steps):
        request.append_output_token(step)
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        held.append(manager.num_total_blocks - manager.num_free_blocks)
    return request, held


def test_sliding_group_holds_only_its_window():
    """One full and one sliding group (window 8, blocks of 4): the full group grows with the request,
    the sliding one stays within cdiv(8 - 1 + 1, 4) + 1 = 3 blocks."""
    manager = KVCacheManager(100, 4, enable_prefix_caching=True, group_windows=(None, 8))
    assert not manager.enable_prefix_caching
    request, held = run_decode(manager, prompt_len=10, num_steps=60)
    num_tokens = 70
    full_rows = -(-num_tokens // 4)
    assert held[-1] <= full_rows + 3
    ids = manager.get_block_ids(request)
    assert len(ids) == 2 * full_rows  # append-only interleaved tables: a released id stays
    assert manager.max_blocks_for(num_tokens, 1) == full_rows + 3
    manager.free(request)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_released_blocks_are_reused_and_capacity_counts_windows():
    manager = KVCacheManager(12, 4, group_windows=(8,))  # every layer slides (Mistral): bounded forever
    _, held = run_decode(manager, prompt_len=4, num_steps=200)
    assert max(held) <= 4
    assert manager.max_tokens_per_request(max_chunk_tokens=4) > 10_000
    full_and_sliding = KVCacheManager(40, 4, group_windows=(None, 8))
    capacity = full_and_sliding.max_tokens_per_request(max_chunk_tokens=1)
    assert full_and_sliding.max_blocks_for(capacity, 1) <= 40 < full_and_sliding.max_blocks_for(capacity + 4, 1)
