"""KV cache groups: layers that share one block table, so sliding-window layers can drop old blocks.

A model whose layers all attend the same way has one group of every layer (one block table per
request, as in the plain paged cache). When sliding-window layers sit among full ones (Gemma 3),
the layers are split into groups of equal size, each either all full or all sliding:

    Gemma 3 270M, 18 layers (every 6th full):  gcd(3 full, 15 sliding) = 3 layers per group
    group 0: full    5 11 17
    group 1: sliding 0  1  2          a block id holds block_size tokens of K/V for 3 layers,
    group 2: sliding 3  4  6          one per KV tensor pair; layer 11 uses pair 1 of the blocks
    ...                               in group 0's table, layer 4 pair 1 of group 2's
    group 5: sliding 14 15 16

All groups draw blocks from one pool. A request holds one block table per group, interleaved in
one append-only list (`block_ids[row * num_groups + group]`, row = position // block_size). A
sliding group frees the blocks of rows that no later query can see (KVCacheManager), so what a
long request holds on those layers is bounded by its window; a freed block's id stays in the list
and is never read again (attention reads only keys inside the window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scalellm.engine.loader.model_config import ModelConfig


@dataclass(frozen=True)
class KVGroup:
    layers: tuple[int, ...]
    sliding_window: int | None
    """Keys a query sees on these layers, counting itself; None: the whole context."""


def kv_groups(config: ModelConfig) -> list[KVGroup]:
    """The model's layers in groups of equal size, each of one attention kind."""
    sliding = [i for i in range(config.num_layers) if config.is_sliding(i)]
    full = [i for i in range(config.num_layers) if not config.is_sliding(i)]
    if not sliding or not full:
        return [KVGroup(tuple(range(config.num_layers)), config.sliding_window if sliding else None)]
    size = math.gcd(len(sliding), len(full))
    return ([KVGroup(tuple(full[i:i + size]), None) for i in range(0, len(full), size)]
            + [KVGroup(tuple(sliding[i:i + size]), config.sliding_window) for i in range(0, len(sliding), size)])


def layer_slots(groups: list[KVGroup]) -> tuple[list[int], list[int]]:
    """Per layer: (its group, its KV tensor pair = its index within the group)."""
    num_layers = sum(len(g.layers) for g in groups)
    group_of, pair_of = [0] * num_layers, [0] * num_layers
    for index, group in enumerate(groups):
        for pair, layer in enumerate(group.layers):
            group_of[layer], pair_of[layer] = index, pair
    return group_of, pair_of


def block_bytes(groups: list[KVGroup], block_size: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype) -> int:
    """Bytes of one block: K and V of block_size tokens for each layer of a group."""
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * len(groups[0].layers) * block_size * num_kv_heads * head_dim * element
