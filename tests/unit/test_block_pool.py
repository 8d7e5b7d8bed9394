"""Block pool: allocation, ref counts, LRU free queue, hash chaining and eviction."""

import pytest

from scalellm.engine.kv_cache.block_pool import ROOT_BLOCK_HASH, BlockPool, hash_block_tokens


def test_allocate_takes_blocks_in_order_with_one_reference():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in blocks)
    assert pool.num_free_blocks == 1
    assert pool.free_block_ids() == [3]


def test_allocate_past_free_blocks_is_a_bug():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(AssertionError):
        pool.allocate(1)


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_free_appends_to_tail_in_given_order():
    pool = BlockPool(4)
    blocks = pool.allocate(4)
    pool.free_blocks(reversed(blocks[:2]))
    assert pool.free_block_ids() == [1, 0]
    assert pool.allocate(1)[0].block_id == 1  # least recently freed first


def test_shared_block_is_freed_only_at_last_reference():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert block.ref_count == 2
    pool.free_blocks([block])
    assert pool.num_free_blocks == 1
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2


def test_double_free_is_caught():
    pool = BlockPool(1)
    blocks = pool.allocate(1)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError):
        pool.free_blocks(blocks)


def test_hash_chains_parent_and_is_deterministic():
    h0 = hash_block_tokens(ROOT_BLOCK_HASH, [1, 2, 3, 4])
    assert h0 == hash_block_tokens(ROOT_BLOCK_HASH, (1, 2, 3, 4))
    assert hash_block_tokens(h0, [5, 6, 7, 8]) != hash_block_tokens(ROOT_BLOCK_HASH, [5, 6, 7, 8])
    assert h0 == hash((0, (1, 2, 3, 4)))  # plain tuple hash: same in every process


def test_freed_cached_block_stays_hit_until_evicted():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, 123)
    pool.free_blocks([block])
    assert pool.get_cached_block(123) is block  # free but still cached
    pool.touch([block])  # a hit takes it back out of the free queue
    assert block.ref_count == 1 and pool.num_free_blocks == 1
    assert pool.free_block_ids() == [1]


def test_lru_eviction_removes_hash():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, block in enumerate(blocks):
        pool.cache_block(block, 100 + i)
    pool.free_blocks([blocks[2], blocks[0], blocks[1]])
    (evicted,) = pool.allocate(1)
    assert evicted is blocks[2]
    assert evicted.block_hash is None and pool.get_cached_block(102) is None
    assert pool.get_cached_block(100) is blocks[0] and pool.num_cached_blocks == 2


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(2)
    first, second = pool.allocate(2)
    pool.cache_block(first, 7)
    pool.cache_block(second, 7)
    assert pool.get_cached_block(7) is first and second.block_hash is None
    pool.free_blocks([first, second])
    pool.allocate(2)  # evicting both leaves the map empty and consistent
    assert pool.num_cached_blocks == 0
