"""Scheduler: batching by token budget, chunked prefill, admission, preemption and aborts.

The helpers at the top (a small config, requests, a fake model runner) are shared by the other
test_scheduler_*.py files.
"""

import pytest

from scalellm.config import EngineConfig
from scalellm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import Scheduler
from scalellm.protocol.types import SamplingParams

SAMPLED_TOKEN_ID = 7


def make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                   enable_prefix_caching=True):
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                          max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(config, num_blocks)


def make_request(request_id, num_prompt_tokens=4, max_tokens=4, eos_token_id=None, first_token_id=100,
                 **params):
    prompt_token_ids = list(range(first_token_id, first_token_id + num_prompt_tokens))
    return Request(request_id, prompt_token_ids, SamplingParams(**params), max_tokens, eos_token_id)


def fake_runner_output(scheduler_output: SchedulerOutput, token_id=SAMPLED_TOKEN_ID) -> ModelRunnerOutput:
    """Samples token_id (an int, or a function of the request) for every chunk that needs a sample."""
    sampled = {}
    for chunk in scheduler_output.chunks:
        if chunk.needs_sample:
            request = chunk.request
            sampled[request.request_id] = token_id(request) if callable(token_id) else token_id
    return ModelRunnerOutput(sampled_token_ids=sampled)


def step(scheduler: Scheduler, token_id=SAMPLED_TOKEN_ID):
    """One engine step; returns (scheduler_output, updates)."""
    output = scheduler.schedule()
    return output, scheduler.update(output, fake_runner_output(output, token_id))


def chunk_sizes(scheduler_output: SchedulerOutput) -> dict[str, int]:
    return {c.request.request_id: c.num_new_tokens for c in scheduler_output.chunks}


def run_to_completion(scheduler: Scheduler, token_id=SAMPLED_TOKEN_ID, max_steps=1000):
    """Steps until nothing is left; returns every update by request id."""
    updates = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return updates
        _, step_updates = step(scheduler, token_id)
        for update in step_updates:
            updates.setdefault(update.request.request_id, []).append(update)
    raise AssertionError("the scheduler made no progress")


def assert_all_blocks_free(scheduler: Scheduler):
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_count == 0 for block in pool.blocks)


# -- batching -------------------------------------------------------------------------------------


def test_prefill_then_decodes_until_max_tokens():
    scheduler = make_scheduler()
    request = make_request("a", num_prompt_tokens=6, max_tokens=3)
    scheduler.add_request(request)
    output = scheduler.schedule()
    (chunk,) = output.chunks
    assert (chunk.start_position, chunk.num_new_tokens, chunk.needs_sample) == (0, 6, True)
    assert chunk.block_ids == scheduler.kv_cache_manager.get_block_ids(request)
    assert request.num_computed_tokens == 6
    updates = scheduler.update(output, fake_runner_output(output))
    assert updates[0].new_token_ids == [SAMPLED_TOKEN_ID] and not updates[0].finished
    assert request.scheduled_time > 0 and request.first_token_time > 0
    output, _ = step(scheduler)
    assert (output.chunks[0].start_position, output.chunks[0].num_new_tokens) == (6, 1)
    _, updates = step(scheduler)
    assert updates[0].finish_reason == "length"
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [SAMPLED_TOKEN_ID] * 3
    assert not scheduler.has_unfinished_requests()
    assert_all_blocks_free(scheduler)


def test_decodes_come_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("old", num_prompt_tokens=8))
    step(scheduler)
    scheduler.add_request(make_request("new", num_prompt_tokens=20, first_token_id=500))
    output, _ = step(scheduler)
    assert chunk_sizes(output) == {"old": 1, "new": 7}
    assert [c.request.request_id for c in output.chunks] == ["old", "new"]
    assert not output.chunks[1].needs_sample


def test_chunked_prefill_with_tiny_budget():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    request = make_request("a", num_prompt_tokens=8, max_tokens=2)
    scheduler.add_request(request)
    starts = []
    for _ in range(3):
        output, updates = step(scheduler)
        starts.append((output.chunks[0].start_position, output.chunks[0].num_new_tokens))
    assert starts == [(0, 3), (3, 3), (6, 2)]
    assert updates and updates[0].new_token_ids == [SAMPLED_TOKEN_ID]
    assert request.num_computed_tokens == 8 and request.num_tokens == 9


def test_budget_is_shared_fcfs_between_waiting_requests():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", num_prompt_tokens=6, first_token_id=100 * (i + 1)))
    output, _ = step(scheduler)
    assert chunk_sizes(output) == {"r0": 6, "r1": 4}
    output, _ = step(scheduler)
    assert chunk_sizes(output) == {"r0": 1, "r1": 2, "r2": 6}


def test_max_num_seqs_caps_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", max_tokens=2, first_token_id=100 * (i + 1)))
    output, _ = step(scheduler)
    assert set(chunk_sizes(output)) == {"r0", "r1"}
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    step(scheduler)  # r0 and r1 finish
    output, _ = step(scheduler)
    assert set(chunk_sizes(output)) == {"r2"}


def test_waiting_head_that_does_not_fit_blocks_later_requests():
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=64)
    scheduler.add_request(make_request("small", num_prompt_tokens=4, max_tokens=8))
    scheduler.add_request(make_request("big", num_prompt_tokens=13, max_tokens=1, first_token_id=300))
    scheduler.add_request(make_request("tiny", num_prompt_tokens=2, max_tokens=1, first_token_id=600))
    output, _ = step(scheduler)
    assert set(chunk_sizes(output)) == {"small"}  # big needs 4 blocks, tiny waits behind it (FCFS)
    assert scheduler.num_waiting == 2


def test_prefix_cache_hit_starts_with_computed_tokens():
    scheduler = make_scheduler()
    first = make_request("a", num_prompt_tokens=10, max_tokens=1)
    scheduler.add_request(first)
    run_to_completion(scheduler)
    second = make_request("b", num_prompt_tokens=10, max_tokens=1)
    scheduler.add_request(second)
    output, _ = step(scheduler)
    assert (output.chunks[0].start_position, output.chunks[0].num_new_tokens) == (8, 2)
    assert second.num_cached_tokens == 8
    load = scheduler.get_load()
    assert (load.prefix_cache_queried_tokens, load.prefix_cache_hit_tokens) == (20, 8)


def test_n_samples_share_prompt_blocks_in_one_step():
    scheduler = make_scheduler()
    samples = [make_request(f"r-{i}", num_prompt_tokens=9, max_tokens=2) for i in range(3)]
    for request in samples:
        scheduler.add_request(request)
    output, _ = step(scheduler)
    assert [c.num_new_tokens for c in output.chunks] == [9, 1, 1]
    assert output.chunks[0].block_ids[:2] == output.chunks[1].block_ids[:2] == output.chunks[2].block_ids[:2]
    assert scheduler.get_load().num_free_blocks == 64 - 2 - 3
    run_to_completion(scheduler)
    assert_all_blocks_free(scheduler)


# -- preemption -----------------------------------------------------------------------------------


def test_preempts_newest_and_recomputes_it_later():
    # 3 blocks of 4 tokens: two requests of 4 prompt tokens fit, but both cannot decode past 8 tokens.
    scheduler = make_scheduler(num_blocks=3)
    old = make_request("old", num_prompt_tokens=4, max_tokens=6)
    new = make_request("new", num_prompt_tokens=4, max_tokens=6, first_token_id=500)
    scheduler.add_request(old)
    scheduler.add_request(new)
    step(scheduler)  # both prefilled: 2 blocks
    step(scheduler)  # both need a second block: old gets the last one, new is preempted
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    while scheduler.has_unfinished_requests():
        step(scheduler)
    assert scheduler.get_load().num_preemptions >= 1
    assert old.output_token_ids == new.output_token_ids == [SAMPLED_TOKEN_ID] * 6
    assert new.num_preemptions >= 1
    assert_all_blocks_free(scheduler)


def test_preemption_is_reported_and_keeps_outputs():
    scheduler = make_scheduler(num_blocks=3)
    old = make_request("old", num_prompt_tokens=4, max_tokens=6)
    new = make_request("new", num_prompt_tokens=4, max_tokens=6, first_token_id=500)
    scheduler.add_request(old)
    scheduler.add_request(new)
    step(scheduler)
    output, _ = step(scheduler)
    assert output.preempted_request_ids == ["new"]
    assert chunk_sizes(output) == {"old": 1}  # nothing is admitted in a step that preempted
    assert new.output_token_ids == [SAMPLED_TOKEN_ID] and new.num_tokens == 5
    assert scheduler.get_load().num_preemptions == 1


def test_request_preempts_itself_when_it_is_the_newest():
    scheduler = make_scheduler(num_blocks=3)
    first = make_request("first", num_prompt_tokens=7, max_tokens=4)  # 2 blocks, decodes into them
    second = make_request("second", num_prompt_tokens=4, max_tokens=4, first_token_id=500)  # 1 block
    scheduler.add_request(first)
    scheduler.add_request(second)
    step(scheduler)
    output, _ = step(scheduler)  # second needs a new block for position 4: none left, and it is newest
    assert output.preempted_request_ids == ["second"]
    assert chunk_sizes(output) == {"first": 1}
    assert second.status is RequestStatus.PREEMPTED
    run_to_completion(scheduler)
    assert second.output_token_ids == [SAMPLED_TOKEN_ID] * 4
    assert_all_blocks_free(scheduler)


def test_request_that_can_never_fit_is_rejected():
    scheduler = make_scheduler(num_blocks=2)
    with pytest.raises(ValueError, match="KV cache"):
        scheduler.add_request(make_request("a", num_prompt_tokens=8, max_tokens=2))
    scheduler.add_request(make_request("b", num_prompt_tokens=8, max_tokens=1))  # exactly 2 blocks
    assert len(run_to_completion(scheduler)["b"]) == 1
    assert_all_blocks_free(scheduler)


def test_rejects_duplicate_ids_and_empty_prompts():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="empty"):
        scheduler.add_request(make_request("b", num_prompt_tokens=0))


# -- finishing from outside (aborts, stop strings) ------------------------------------------------


def test_abort_waiting_request():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(make_request("a"))
    scheduler.add_request(make_request("b"))
    step(scheduler)
    finished = scheduler.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in finished] == ["b"] and finished[0].status is RequestStatus.FINISHED_ABORTED
    assert scheduler.num_waiting == 0
    run_to_completion(scheduler)
    assert_all_blocks_free(scheduler)


def test_abort_running_request_frees_blocks():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", max_tokens=100))
    step(scheduler)
    assert scheduler.get_load().num_free_blocks < 64
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert (scheduler.num_running, scheduler.has_unfinished_requests()) == (0, False)
    assert_all_blocks_free(scheduler)


def test_abort_preempted_request():
    scheduler = make_scheduler(num_blocks=3)
    scheduler.add_request(make_request("old", max_tokens=6))
    scheduler.add_request(make_request("new", max_tokens=6, first_token_id=500))
    step(scheduler)
    step(scheduler)
    scheduler.finish_requests(["new"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.num_waiting == 0
    run_to_completion(scheduler)
    assert_all_blocks_free(scheduler)


def test_finish_between_schedule_and_update_drops_the_sample():
    scheduler = make_scheduler()
    request = make_request("a", max_tokens=5)
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert scheduler.update(output, fake_runner_output(output)) == []
    assert request.output_token_ids == [] and request.status is RequestStatus.FINISHED_STOPPED
    assert_all_blocks_free(scheduler)


def test_finish_ignores_unknown_ids_and_needs_a_finished_status():
    scheduler = make_scheduler()
    assert scheduler.finish_requests(["nope"], RequestStatus.FINISHED_ABORTED) == []
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_requests(["nope"], RequestStatus.RUNNING)


def test_load_counts_tokens_in_flight():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", num_prompt_tokens=6, max_tokens=3))
    scheduler.add_request(make_request("b", num_prompt_tokens=2, max_tokens=5))
    assert scheduler.get_load().num_tokens_in_flight == 6 + 3 + 2 + 5
    step(scheduler)  # a: 4 prompt tokens computed
    load = scheduler.get_load()
    assert load.num_tokens_in_flight == 2 + 3 + 2 + 5
    assert (load.num_running, load.num_waiting, load.num_total_blocks) == (1, 1, 64)
