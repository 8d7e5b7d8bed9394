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
    """What the manager holds for one admitted request."""

    blocks: list[KVBlock] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_registered_blocks: int = 0
    """Leading full blocks whose hash is registered (or that came from the cache)."""


class KVCacheManager:
    """Hands the scheduler opaque allocations of KV slots, with optional prefix caching.

    Protocol for one request:
      1. when first scheduled (or rescheduled after preemption): `get_computed_blocks(request)`, then
         `allocate_slots(request, num_new_tokens, new_computed_blocks=blocks)`; on success the caller
         sets request.num_computed_tokens to the cached token count;
      2. each later step: `allocate_slots(request, num_new_tokens)`;
      3. when finished or preempted: `free(request)`.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
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
        """A copy of the request's block table: block_ids[p // block_size] holds token position p."""
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
        num_held_blocks = len(held.blocks) if held is not None else 0
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_total = num_computed + num_new_tokens
        assert num_total <= request.num_tokens, "scheduled past the known tokens"
        num_new_blocks = max(0, cdiv(num_total, self.block_size) - num_held_blocks - len(new_computed_blocks))
        num_revived = sum(1 for block in new_computed_blocks if block.ref_count == 0)
        if num_new_blocks + num_revived > self.block_pool.num_free_blocks:
            return False
        if held is None:
            held = self._start_request(request, len(new_computed_blocks))
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
            self.block_pool.free_blocks(reversed(held.blocks))

    def _start_request(self, request: Request, num_hit_blocks: int) -> _RequestBlocks:
        """The request is admitted: count the prefix-cache lookup it made."""
        held = self._requests[request.request_id] = _RequestBlocks(num_registered_blocks=num_hit_blocks)
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
