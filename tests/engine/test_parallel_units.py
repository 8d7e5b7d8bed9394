"""Tensor parallelism without processes: how tensors are split, and the per-step diffs that keep the
workers' request mirror equal to rank 0's scheduler state (preemption, prefix hits, aborts)."""

from __future__ import annotations

import random

import pytest
import torch

from scalellm.config import EngineConfig
from scalellm.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.partition import Slice, balanced_slice, max_local_kv_heads, partition_heads
from scalellm.engine.outputs import ModelRunnerOutput
from scalellm.engine.parallel.group import ParallelGroup
from scalellm.engine.parallel.messages import (SCORE, SHUTDOWN, STEP, decode, encode_score, encode_shutdown,
                                               encode_step)
from scalellm.engine.parallel.step_diff import DiffEncoder, RequestMirror
from scalellm.engine.quantization import get_quantization_method
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import Scheduler
from scalellm.engine.step_inputs import build_step_inputs
from scalellm.protocol.types import SamplingParams


@pytest.mark.parametrize("total,world_size", [(7, 3), (3, 2), (8, 4), (1, 2), (49152, 2)])
def test_balanced_slices_tile_the_dimension(total, world_size):
    slices = [balanced_slice(total, world_size, rank) for rank in range(world_size)]
    assert slices[0].start == 0 and slices[-1].end == total
    assert all(a.end == b.start for a, b in zip(slices, slices[1:]))
    assert max(s.size for s in slices) - min(s.size for s in slices) <= 1


def test_uneven_kv_heads_split_with_their_query_heads():
    # SmolLM2-135M: 9 query heads over 3 KV heads, on 2 ranks
    first, second = (partition_heads(9, 3, 2, rank) for rank in range(2))
    assert (first.kv, second.kv) == (Slice(3, 0, 2), Slice(3, 2, 1))
    assert (first.q, second.q) == (Slice(9, 0, 6), Slice(9, 6, 3))
    assert max_local_kv_heads(9, 3, 2) == 2


def test_fewer_kv_heads_than_ranks_are_replicated():
    parts = [partition_heads(8, 2, 4, rank) for rank in range(4)]
    assert [p.kv.start for p in parts] == [0, 0, 1, 1] and all(p.kv.size == 1 for p in parts)
    assert [(p.q.start, p.q.size) for p in parts] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    # each rank's query heads read the KV head it holds (4 query heads per KV head)
    assert all(p.q.start // 4 == p.kv.start for p in parts)


@pytest.mark.parametrize("heads", [(6, 2, 3), (4, 1, 3)])
def test_heads_that_cannot_be_split_are_a_value_error(heads):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        partition_heads(*heads, rank=0)


class RankView(ParallelGroup):
    """One rank of a group, seen alone: layers are built and loaded as that rank, without peers."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor):
        raise AssertionError("not used by these tests")

    def gather_to_first(self, tensor, dim):
        raise AssertionError("not used by these tests")

    def broadcast_bytes(self, data):
        raise AssertionError("not used by these tests")


def test_qkv_shards_load_each_ranks_heads():
    torch.manual_seed(0)
    head_dim, hidden = 4, 8
    q, k, v = torch.randn(9 * head_dim, hidden), torch.randn(3 * head_dim, hidden), torch.randn(3 * head_dim, hidden)
    rows = []
    for rank in range(2):
        layer = QKVParallelLinear(hidden, head_dim, 9, 3, LayerOptions(group=RankView(rank, 2)))
        for name, tensor in (("q", q), ("k", k), ("v", v)):
            layer.load(tensor, name)
        num_q, num_kv = layer.num_local_heads * head_dim, layer.num_local_kv_heads * head_dim
        rows.append(layer.weight.split([num_q, num_kv, num_kv]))
    assert torch.equal(torch.cat([rows[0][0], rows[1][0]]), q)
    assert torch.equal(torch.cat([rows[0][1], rows[1][1]]), k)
    assert torch.equal(torch.cat([rows[0][2], rows[1][2]]), v)


def test_int8_column_shards_equal_the_unsharded_int8_rows():
    """Per-output-channel scales: each rank's rows quantize exactly as they do unsharded."""
    torch.manual_seed(0)
    gate, up, x = torch.randn(12, 16), torch.randn(12, 16), torch.randn(5, 16)

    def build(rank: int, world_size: int) -> ColumnParallelLinear:
        options = LayerOptions(quant=get_quantization_method("int8"), group=RankView(rank, world_size))
        layer = ColumnParallelLinear(16, [12, 12], options, shard_names=["gate", "up"])
        layer.load(gate, "gate")
        layer.load(up, "up")
        layer.process_weights_after_loading()
        return layer

    whole = build(0, 1)(x)  # [5, 24]: gate | up
    halves = [build(rank, 2)(x) for rank in range(2)]  # [5, 12] each: gate rows | up rows
    assert torch.equal(torch.cat([halves[0][:, :6], halves[1][:, :6], halves[0][:, 6:], halves[1][:, 6:]], 1),
                       whole)


def test_messages_round_trip():
    assert decode(encode_score([1, 2, 3])) == (SCORE, [1, 2, 3])
    assert decode(encode_shutdown()) == (SHUTDOWN, None)
    with pytest.raises(ValueError):
        decode(b'{"kind": "reboot"}')


def _random_request(rng: random.Random, index: int) -> Request:
    # A 3-token alphabet makes shared prefixes (prefix-cache hits) frequent.
    prompt = [rng.randrange(3, 6) for _ in range(rng.randint(1, 20))]
    return Request(f"r{index}", prompt, SamplingParams(), max_tokens=rng.randint(1, 8), eos_token_id=None)


def _assert_same_step_inputs(original, mirrored, block_size: int) -> None:
    a = build_step_inputs(original, block_size, (None,), torch.device("cpu"))
    b = build_step_inputs(mirrored, block_size, (None,), torch.device("cpu"))
    for name in ("token_ids", "positions", "sample_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert len(a.attention) == len(b.attention) == 1  # one KV cache group: every layer attends in full
    for x, y in zip(a.attention, b.attention):
        assert torch.equal(x.slot_mapping, y.slot_mapping)
        assert [s.kv_slots.tolist() for s in x.prefills] == [s.kv_slots.tolist() for s in y.prefills]
        if x.decode_block_table is not None:
            assert torch.equal(x.decode_block_table, y.decode_block_table)


@pytest.mark.parametrize("seed", range(6))
def test_mirror_rebuilt_from_diffs_equals_the_schedulers_steps(seed):
    rng = random.Random(seed)
    block_size = 2
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=rng.randint(3, 16), max_num_seqs=6)
    scheduler = Scheduler(config, num_blocks=rng.randint(12, 20))
    encoder, mirror = DiffEncoder(), RequestMirror()
    num_preemptions = num_steps = 0
    for index in range(40):
        scheduler.add_request(_random_request(rng, index))
        for _ in range(rng.randint(0, 3)):
            scheduled = scheduler.schedule()
            num_preemptions += len(scheduled.preempted_request_ids)
            if scheduled.is_empty:
                continue
            wire = decode(encode_step(encoder.encode(scheduled)))
            assert wire[0] == STEP
            _assert_same_step_inputs(scheduled, mirror.apply(wire[1]), block_size)
            assert len(mirror) == encoder.num_known_requests
            num_steps += 1
            sampled = {c.request.request_id: rng.randrange(3, 6) for c in scheduled.chunks if c.needs_sample}
            updates = scheduler.update(scheduled, ModelRunnerOutput(sampled_token_ids=sampled))
            encoder.forget(u.request.request_id for u in updates if u.finished)
        if rng.random() < 0.1:  # an abort
            victims = [f"r{rng.randrange(index + 1)}"]
            scheduler.finish_requests(victims, RequestStatus.FINISHED_ABORTED)
            encoder.forget(victims)
    assert num_steps > 20 and num_preemptions > 0 and scheduler.kv_cache_manager.prefix_cache_hit_tokens > 0
