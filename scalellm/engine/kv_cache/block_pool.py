"""The block pool: fixed-size KV blocks, their reference counts, and the prefix-cache map.

A block is in exactly one of two states:

    owned      ref_count >= 1, not in the free queue
    free       ref_count == 0, in the free queue (oldest freed first); it may still carry a hash,
               so a later request can take it back out of the queue as a prefix-cache hit

Allocation pops the least recently freed block and evicts its hash (if any) from the cache map.
`free_blocks` is the only method that decrements reference counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

ROOT_BLOCK_HASH = 0
"""The parent hash of a sequence's first block (a fixed int, so hashes match across processes)."""


def hash_block_tokens(parent_block_hash: int, token_ids: Sequence[int]) -> int:
    """The hash of one full block, chained to the hash of the block before it.

    Python's hash of ints and of tuples of ints is not salted (PYTHONHASHSEED only affects str and
    bytes), so the same tokens give the same hash in every process. It is a 64-bit hash: two different
    prefixes colliding would silently share KV, which at 2**-64 per pair we accept.
    """
    return hash((parent_block_hash, tuple(token_ids)))


@dataclass(eq=False)
class KVBlock:
    """One block of block_size KV slots."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    """Set once the block is full and registered in the prefix cache; cleared on eviction."""


class BlockPool:
    """Owns num_blocks blocks: a free queue in LRU order, ref counts, and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        self._free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached_blocks: dict[int, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they are evictable)."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached_blocks)

    def free_block_ids(self) -> list[int]:
        """The free queue, least recently freed first (the next to be allocated)."""
        return list(self._free_queue)

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        """The block holding this hash, free or owned; None on a miss. Changes nothing."""
        return self._cached_blocks.get(block_hash)

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        """Take num_blocks blocks from the head of the free queue, evicting their hashes; ref_count 1.

        The caller checks num_free_blocks first; asking for more is a bug.
        """
        assert num_blocks <= len(self._free_queue), "allocate() past the free blocks"
        blocks = []
        for _ in range(num_blocks):
            _, block = self._free_queue.popitem(last=False)
            self._evict(block)
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to each block (prefix-cache hits); a free block leaves the free queue."""
        for block in blocks:
            if block.ref_count == 0:
                del self._free_queue[block.block_id]
            block.ref_count += 1

    def cache_block(self, block: KVBlock, block_hash: int) -> None:
        """Register a full, owned block under block_hash.

        When another block already holds the hash (two requests computed the same tokens), the first
        one stays cached and this block stays unhashed: it is freed like any other block.
        """
        assert block.ref_count > 0 and block.block_hash is None
        if block_hash not in self._cached_blocks:
            block.block_hash = block_hash
            self._cached_blocks[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in the given order. The only place blocks are freed.

        A block whose count reaches 0 goes to the tail of the free queue (evicted last), keeping its
        hash, so pass a sequence's blocks tail first: its rarely shared last blocks are evicted first.
        """
        for block in blocks:
            assert block.ref_count > 0, f"block {block.block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free_queue[block.block_id] = block

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached_blocks[block.block_hash]
            block.block_hash = None
