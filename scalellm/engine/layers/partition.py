"""Which part of a checkpoint tensor each rank of a tensor-parallel group keeps.

A dimension of n units is split over w ranks in balanced runs; the first n % w ranks take one unit
more, so any n works (SmolLM2's 3 KV heads on 2 ranks become 2 + 1):

    n = 7, w = 3     rank 0: [0, 3)    rank 1: [3, 5)    rank 2: [5, 7)

Attention is split at KV-head granularity: a rank keeps some KV heads and the query heads that read
them. With fewer KV heads than ranks, each KV head is replicated on w / KH ranks, which split that
head's query heads between them:

    H = 8, KH = 2, w = 4   kv: rank 0, 1 -> head 0; rank 2, 3 -> head 1    q: 2 heads per rank
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slice:
    """Units [start, start + size) of a checkpoint dimension that has `total` units."""

    total: int
    start: int
    size: int

    def __post_init__(self) -> None:
        if not (0 <= self.start and 0 <= self.size and self.start + self.size <= self.total):
            raise ValueError(f"slice [{self.start}, {self.start + self.size}) does not fit in {self.total}")

    @property
    def end(self) -> int:
        return self.start + self.size

    @classmethod
    def whole(cls, total: int) -> "Slice":
        return cls(total, 0, total)

    def scaled(self, unit: int) -> "Slice":
        """The same slice in units `unit` times smaller (heads -> rows of head_dim each)."""
        return Slice(self.total * unit, self.start * unit, self.size * unit)


def balanced_slice(total: int, world_size: int, rank: int) -> Slice:
    """Rank `rank`'s run of a balanced split of `total` units over `world_size` ranks."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return Slice(total, start, base + (1 if rank < extra else 0))


@dataclass(frozen=True)
class HeadPartition:
    """One rank's attention heads, in head units."""

    q: Slice
    kv: Slice


def partition_heads(num_heads: int, num_kv_heads: int, world_size: int, rank: int) -> HeadPartition:
    """The query and KV heads rank `rank` computes. ValueError when the heads cannot be split."""
    group = num_heads // num_kv_heads  # query heads per KV head
    if num_kv_heads >= world_size:
        kv = balanced_slice(num_kv_heads, world_size, rank)
        return HeadPartition(q=Slice(num_heads, kv.start * group, kv.size * group), kv=kv)
    ranks_per_kv_head = world_size // num_kv_heads
    if world_size % num_kv_heads or group % ranks_per_kv_head:
        raise ValueError(
            f"tensor_parallel_size {world_size} cannot split {num_heads} attention heads with "
            f"{num_kv_heads} KV heads: use a size that divides {num_kv_heads}, or a multiple of it that "
            f"divides {num_heads}")
    num_q = num_heads // world_size
    return HeadPartition(q=Slice(num_heads, rank * num_q, num_q),
                         kv=Slice(num_kv_heads, rank // ranks_per_kv_head, 1))


def max_local_kv_heads(num_heads: int, num_kv_heads: int, world_size: int) -> int:
    """The most KV heads any rank keeps: every rank sizes its KV cache blocks by it, so all ranks hold
    the same number of blocks (the scheduler on rank 0 hands out block ids for all of them)."""
    return max(partition_heads(num_heads, num_kv_heads, world_size, rank).kv.size for rank in range(world_size))
