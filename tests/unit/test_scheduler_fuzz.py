"""Random submit / step / abort / finish sequences on tiny KV caches, checking invariants after each.

Prompts come from a 3-token alphabet so that prefix-cache hits, shared blocks and evictions happen
often; block counts are tiny so that preemption does too.
"""

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from scalellm.config import EngineConfig
from scalellm.engine.kv_cache.manager import cdiv
from scalellm.engine.outputs import ModelRunnerOutput
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import Scheduler
from scalellm.protocol.types import SamplingParams

EOS = 2
MAX_DRAIN_STEPS = 2000


class SchedulerMachine(RuleBasedStateMachine):
    """Tracks the unfinished requests itself and compares the scheduler's state against them."""

    @initialize(num_blocks=st.integers(2, 10), block_size=st.sampled_from([1, 2, 4]),
                budget=st.integers(1, 12), max_num_seqs=st.integers(1, 4), prefix_caching=st.booleans())
    def setup(self, num_blocks, block_size, budget, max_num_seqs, prefix_caching):
        config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget,
                              max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching)
        self.scheduler = Scheduler(config, num_blocks)
        self.block_size = block_size
        self.capacity = num_blocks * block_size
        self.requests: dict[str, Request] = {}
        self.num_submitted = 0

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14), max_tokens=st.integers(1, 6),
          num_samples=st.integers(1, 3), min_tokens=st.integers(0, 2), ignore_eos=st.booleans(),
          stop_token_ids=st.lists(st.integers(0, 5), max_size=2))
    def submit(self, prompt, max_tokens, num_samples, min_tokens, ignore_eos, stop_token_ids):
        params = SamplingParams(min_tokens=min_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids)
        for _ in range(num_samples):
            request = Request(f"r{self.num_submitted}", list(prompt), params, max_tokens, EOS)
            self.num_submitted += 1
            if len(prompt) + max_tokens - 1 > self.capacity:
                try:
                    self.scheduler.add_request(request)
                except ValueError:
                    continue
                raise AssertionError("a request larger than the cache was accepted")
            self.scheduler.add_request(request)
            self.requests[request.request_id] = request

    @rule(token_id=st.integers(0, 5))
    def step(self, token_id):
        output = self.scheduler.schedule()
        self.check_output(output)
        self.apply(output, self.scheduler.update(output, sample_all(output, token_id)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(),
          status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
    def finish(self, data, status):
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        finished = self.scheduler.finish_requests([request_id, "unknown"], status)
        assert [r.request_id for r in finished] == [request_id]
        del self.requests[request_id]

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), token_id=st.integers(0, 5))
    def abort_between_schedule_and_update(self, data, token_id):
        output = self.scheduler.schedule()
        self.check_output(output)
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED)
        del self.requests[request_id]
        updates = self.scheduler.update(output, sample_all(output, token_id))
        assert request_id not in {u.request.request_id for u in updates}
        self.apply(output, updates)

    def apply(self, output, updates):
        for update in updates:
            assert update.new_token_ids and update.request.request_id in self.requests
            if update.finished:
                assert update.request.is_finished
                del self.requests[update.request.request_id]

    def check_output(self, output):
        config = self.scheduler.config
        assert 0 < output.num_batched_tokens <= config.max_num_batched_tokens or not self.requests
        assert self.scheduler.num_running <= config.max_num_seqs
        for chunk in output.chunks:
            end = chunk.start_position + chunk.num_new_tokens
            assert chunk.num_new_tokens >= 1 and end <= chunk.request.num_tokens
            assert len(chunk.block_ids) == cdiv(end, self.block_size)
            assert chunk.request.request_id not in output.preempted_request_ids

    @invariant()
    def blocks_are_consistent(self):
        if not hasattr(self, "scheduler"):
            return
        manager = self.scheduler.kv_cache_manager
        pool = manager.block_pool
        owners = {block.block_id: 0 for block in pool.blocks}
        for request in self.requests.values():
            assert 0 <= request.num_computed_tokens <= request.num_tokens
            block_ids = manager.get_block_ids(request)
            if request.status is RequestStatus.RUNNING:
                assert len(block_ids) == cdiv(request.num_computed_tokens, self.block_size)
            else:
                assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
                assert block_ids == [] and request.num_computed_tokens == 0
            for block_id in block_ids:
                owners[block_id] += 1
        free_ids = set(pool.free_block_ids())
        for block in pool.blocks:
            assert block.ref_count == owners[block.block_id]
            assert (block.ref_count == 0) == (block.block_id in free_ids)
            if block.block_hash is not None:
                assert pool.get_cached_block(block.block_hash) is block
        assert pool.num_cached_blocks == sum(b.block_hash is not None for b in pool.blocks)
        assert self.scheduler.num_running + self.scheduler.num_waiting == len(self.requests)
        assert self.scheduler.has_unfinished_requests() == bool(self.requests)

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        for _ in range(MAX_DRAIN_STEPS):
            if not self.scheduler.has_unfinished_requests():
                break
            self.step(token_id=5)
            self.blocks_are_consistent()
        assert not self.requests and self.scheduler.num_running == 0
        pool = self.scheduler.kv_cache_manager.block_pool
        assert pool.num_free_blocks == pool.num_blocks


def sample_all(output, token_id) -> ModelRunnerOutput:
    return ModelRunnerOutput({c.request.request_id: token_id for c in output.chunks if c.needs_sample})


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestSchedulerMachine = SchedulerMachine.TestCase
