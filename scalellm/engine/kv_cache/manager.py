"""The KV cache manager: the scheduler's only view of KV blocks.

Per request it keeps the block table (block i holds token positions [i * block_size, (i+1) * block_size))
and the chained hashes of the request's full blocks. For block_size 4:

    all_token_ids   t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    blocks          block 0     | block 1     | block 2 (partial, never hashed)
    block_hashes    h0          | h1          |
                    h0 = hash((ROOT, (t0..t3))), h1 = hash((h0, (t4..t7)))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from scalellm.engine.kv_cache.block_pool import ROOT_BLOCK_HASH, BlockPool, KVBlock, hash_block_tokens
from scalellm.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class _RequestBlocks:
    """What the manager holds for one admitted request (groups.py: one table per KV group,
    interleaved, entry row * num_groups + group)."""

    blocks: list[KVBlock | None] = field(default_factory=list)
    """None where a sliding group released the block."""
    block_ids: list[int] = field(default_factory=list)
    """Append-only: a released block's id stays (its positions are never read again)."""
    num_registered_blocks: int = 0
    """Leading full blocks whose hash is registered (or that came from the cache)."""
    num_released_rows: list[int] = field(default_factory=list)
    """Per group, the leading rows whose blocks were released."""


class KVCacheManager:
    """Hands the scheduler opaque allocations of KV slots, with optional prefix caching.

    Protocol for one request:
      1. when first scheduled (or rescheduled after preemption): `get_computed_blocks(request)`, then
         `allocate_slots(request, num_new_tokens, new_computed_blocks=blocks)`; on success the caller
         sets request.num_computed_tokens to the cached token count;
      2. each later step: `allocate_slots(request, num_new_tokens)`;
      3. when finished or preempted: `free(request)`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 group_windows: tuple[int | None, ...] = (None,)) -> None:
        """group_windows: per KV group (groups.py), its sliding window or None. Prefix caching
        applies only to one group without a window."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.group_windows = tuple(group_windows)
        self.num_groups = len(self.group_windows)
        self.enable_prefix_caching = enable_prefix_caching and self.group_windows == (None,)
        self.block_pool = BlockPool(num_blocks)
        self._requests: dict[str, _RequestBlocks] = {}
        self._block_hashes: dict[str, list[int]] = {}
        """Hashes of each request's full blocks, memoized; tokens are only appended, so they never change."""
        self.prefix_cache_queried_tokens = 0
        """Cumulative tokens of admitted requests looked up in the prefix cache."""
        self.prefix_cache_hit_tokens = 0
        """Cumulative tokens of admitted requests found there."""

    @property
    def num_total_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def get_block_ids(self, request: Request) -> list[int]:
        """A copy of the request's block tables: block_ids[(p // block_size) * num_groups + g] holds token
        position p of group g's layers."""
        held = self._requests.get(request.request_id)
        return list(held.block_ids) if held is not None else []

    def get_computed_blocks(self, request: Request) -> tuple[int, list[KVBlock]]:
        """The longest chain of cached full blocks matching the request's tokens, and its token count.

        Never covers the whole sequence: at least the last token is left to compute, so that a sample
        can be drawn. Changes nothing; pass the blocks to `allocate_slots` to take them.
        """
        if not self.enable_prefix_caching:
            return 0, []
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in self._hashes_of(request, max_num_blocks):
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return len(blocks) * self.block_size, blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVBlock] = ()) -> bool:
        """Make room for KV of num_new_tokens more tokens of the request; False (changing nothing) if
        there are not enough free blocks.

        The new tokens start after request.num_computed_tokens plus the new_computed_blocks' tokens:

            | computed (num_computed_tokens) | new_computed_blocks | num_new_tokens |

        Full blocks among the new tokens are registered in the prefix cache right away, so later
        requests in the same step can share them (the runner writes a step's KV before attending).
        This assumes every scheduled chunk is run; if a step fails, its registered blocks hold no KV.
        """
        assert num_new_tokens >= 1
        held = self._requests.get(request.request_id)
        assert held is None or not new_computed_blocks, "cache hits are taken only at admission"
        num_held_rows = len(held.blocks) // self.num_groups if held is not None else 0
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        assert num_total <= request.num_tokens, "scheduled past the known tokens"
        num_new_rows = max(0, cdiv(num_total, self.block_size) - num_held_rows - len(new_computed_blocks))
        num_new_blocks = num_new_rows * self.num_groups
        num_revived = sum(1 for block in new_computed_blocks if block.ref_count == 0)
        outside = self._outside_windows(held, num_computed) if held is not None else []
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks + len(outside):
            return False
        if held is None:
            held = self._start_request(request, len(new_computed_blocks))
        self._release(held, outside)
        self.block_pool.touch(new_computed_blocks)
        new_blocks = [*new_computed_blocks, *self.block_pool.allocate(num_new_blocks)]
        held.blocks.extend(new_blocks)
        held.block_ids.extend(block.block_id for block in new_blocks)
        self._register_full_blocks(request, held, num_total // self.block_size)
        return True

    def free(self, request: Request) -> None:
        """Release everything the request holds (finished, aborted or preempted). Unknown ids: no-op."""
        self._block_hashes.pop(request.request_id, None)
        held = self._requests.pop(request.request_id, None)
        if held is not None:
            self.block_pool.free_blocks(block for block in reversed(held.blocks) if block is not None)

    def max_blocks_for(self, num_tokens: int, max_chunk_tokens: int) -> int:
        """The most blocks one request of num_tokens ever holds when computed in chunks of at most
        max_chunk_tokens: every row in a full group; in a sliding group, the rows that a chunk's
        queries can see (window - 1 keys before the chunk) plus a partial row."""
        num_rows = cdiv(num_tokens, self.block_size)
        window_rows = [num_rows if w is None else min(num_rows, cdiv(w - 1 + max_chunk_tokens, self.block_size) + 1)
                       for w in self.group_windows]
        return sum(window_rows)

    def max_tokens_per_request(self, max_chunk_tokens: int) -> int:
        """The longest request the whole pool holds (None-windowed groups grow with its length)."""
        num_blocks, size = self.num_total_blocks, self.block_size
        num_full = sum(1 for w in self.group_windows if w is None)
        if num_full == 0:
            return 1 << 40 if self.max_blocks_for(1 << 40, max_chunk_tokens) <= num_blocks else 0
        low, high = 0, num_blocks // num_full + 1  # rows; max_blocks_for is monotonic in them
        while low < high:
            mid = (low + high + 1) // 2
            if self.max_blocks_for(mid * size, max_chunk_tokens) <= num_blocks:
                low = mid
            else:
                high = mid - 1
        return low * size

    def _outside_windows(self, held: _RequestBlocks, num_computed: int) -> list[int]:
        """Indexes into held.blocks of sliding groups' blocks that no query from position num_computed on
        can see: a query at p reads keys (p - window, p], so rows ending at or before
        num_computed - window + 1 are done."""
        indexes = []
        for group, window in enumerate(self.group_windows):
            if window is None:
                continue
            num_done_rows = min(max(0, num_computed - window + 1) // self.block_size,
                                len(held.blocks) // self.num_groups)
            for row in range(held.num_released_rows[group], num_done_rows):
                indexes.append(row * self.num_groups + group)
        return indexes

    def _release(self, held: _RequestBlocks, indexes: list[int]) -> None:
        """Give back blocks that fell out of their group's window (their ids stay in the table)."""
        self.block_pool.free_blocks(held.blocks[i] for i in reversed(indexes))
        for i in indexes:
            held.blocks[i] = None
            row, group = divmod(i, self.num_groups)
            held.num_released_rows[group] = max(held.num_released_rows[group], row + 1)

    def _start_request(self, request: Request, num_hit_blocks: int) -> _RequestBlocks:
        """The request is admitted: count the prefix-cache lookup it made."""
        held = self._requests[request.request_id] = _RequestBlocks(num_registered_blocks=num_hit_blocks,
                                                                   num_released_rows=[0] * self.num_groups)
        if self.enable_prefix_caching:
            self.prefix_cache_queried_tokens += request.num_tokens
            self.prefix_cache_hit_tokens += num_hit_blocks * self.block_size
        return held

    def _register_full_blocks(self, request: Request, held: _RequestBlocks, num_full_blocks: int) -> None:
        start = held.num_registered_blocks
        if not self.enable_prefix_caching or num_full_blocks <= start:
            return
        hashes = self._hashes_of(request, num_full_blocks)
        for index in range(start, num_full_blocks):
            self.block_pool.cache_block(held.blocks[index], hashes[index])
        held.num_registered_blocks = num_full_blocks

    def _hashes_of(self, request: Request, num_blocks: int) -> list[int]:
        """Hashes of the request's first num_blocks full blocks, extending the memo as needed.

        Tokens are only ever appended to a request, so a full block's hash never changes.
        """
        hashes = self._block_hashes.setdefault(request.request_id, [])
        token_ids = request.all_token_ids
        size = self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
            hashes.append(hash_block_tokens(parent, token_ids[index * size:(index + 1) * size]))
        return hashes[:num_blocks]
