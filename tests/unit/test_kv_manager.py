"""KV cache manager: slot allocation, freeing, prefix-cache hits and sharing between samples."""

from scalellm.engine.kv_cache.manager import KVCacheManager
from scalellm.engine.request import Request
from scalellm.protocol.types import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id, prompt_token_ids, max_tokens=8):
    return Request(request_id, list(prompt_token_ids), SamplingParams(), max_tokens)


def admit(manager, request, num_new_tokens=None):
    """What the scheduler does when it first schedules a request."""
    num_cached, blocks = manager.get_computed_blocks(request)
    num_new = request.num_tokens - num_cached if num_new_tokens is None else num_new_tokens
    assert manager.allocate_slots(request, num_new, new_computed_blocks=blocks)
    request.num_computed_tokens = num_cached + num_new
    return num_cached


def test_allocates_blocks_for_tokens_and_frees_them():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", range(10))
    admit(manager, request)
    assert len(manager.get_block_ids(request)) == 3
    assert manager.num_free_blocks == 5
    assert manager.usage == 3 / 8
    manager.free(request)
    assert manager.num_free_blocks == 8 and manager.get_block_ids(request) == []
    manager.free(request)  # unknown id: no-op


def test_decode_adds_a_block_only_at_block_boundary():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    request = make_request("a", range(4))
    admit(manager, request)
    assert len(manager.get_block_ids(request)) == 1
    request.append_output_token(99)
    assert manager.allocate_slots(request, 1)
    assert len(manager.get_block_ids(request)) == 2


def test_allocation_failure_changes_nothing():
    manager = KVCacheManager(num_blocks=2, block_size=BLOCK_SIZE)
    request = make_request("a", range(12))
    assert not manager.allocate_slots(request, 12)
    assert manager.num_free_blocks == 2 and manager.get_block_ids(request) == []
    assert manager.prefix_cache_queried_tokens == 0


def test_prefix_hit_reuses_blocks_and_caps_below_whole_prompt():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_request("a", range(12))
    admit(manager, first)
    manager.free(first)
    second = make_request("b", range(12))  # same 3 full blocks: only 2 may be reused
    assert admit(manager, second) == 8
    assert manager.get_block_ids(second)[:2] == [0, 1]
    third = make_request("c", list(range(8)) + [50, 51, 52])
    assert admit(manager, third) == 8
    assert manager.prefix_cache_queried_tokens == 12 + 12 + 11
    assert manager.prefix_cache_hit_tokens == 16


def test_no_hits_without_prefix_caching():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    first = make_request("a", range(12))
    admit(manager, first)
    assert admit(manager, make_request("b", range(12))) == 0
    assert manager.prefix_cache_queried_tokens == 0


def test_hash_chain_distinguishes_same_block_after_different_prefix():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    admit(manager, make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 3]))
    assert admit(manager, make_request("b", [9, 9, 9, 9, 2, 2, 2, 2, 3])) == 0


def test_n_samples_share_prompt_blocks_in_the_same_step():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    samples = [make_request(f"r-{i}", range(10)) for i in range(3)]
    assert [admit(manager, r) for r in samples] == [0, 8, 8]
    tables = [manager.get_block_ids(r) for r in samples]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3  # the partial last block is private
    assert manager.num_free_blocks == 16 - 3 - 2
    shared = manager.block_pool.blocks[tables[0][0]]
    assert shared.ref_count == 3


def test_chunked_prefill_registers_full_blocks_as_scheduled():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_request("a", range(14))
    admit(manager, first, num_new_tokens=6)  # block 0 full, block 1 half
    assert admit(manager, make_request("b", range(14))) == 4


def test_lru_eviction_of_unreferenced_cached_blocks():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    old = make_request("old", range(9))  # 2 full blocks + 1
    admit(manager, old)
    manager.free(old)
    assert manager.block_pool.num_cached_blocks == 2
    big = make_request("big", range(100, 113))  # needs all 4 blocks: evicts both cached ones
    admit(manager, big)
    assert manager.num_free_blocks == 0
    assert admit_fails(manager, make_request("again", range(9)))
    manager.free(big)
    assert manager.get_computed_blocks(make_request("again", range(9)))[0] == 0


def test_cached_free_blocks_count_against_free_space_when_hit():
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    old = make_request("old", range(9))
    admit(manager, old)
    manager.free(old)
    holder = make_request("holder", range(200, 202))  # takes the one block that carries no hash
    admit(manager, holder)
    again = make_request("again", range(9))
    num_cached, blocks = manager.get_computed_blocks(again)
    assert num_cached == 8
    # The 2 hits are free blocks and a third block is needed for token 8: 3 > 2 free.
    assert not manager.allocate_slots(again, 1, new_computed_blocks=blocks)
    assert all(b.ref_count == 0 for b in blocks) and manager.num_free_blocks == 2


def admit_fails(manager, request):
    num_cached, blocks = manager.get_computed_blocks(request)
    return not manager.allocate_slots(request, request.num_tokens - num_cached, new_computed_blocks=blocks)
