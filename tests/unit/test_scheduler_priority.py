"""Priorities in the scheduler: lower first in the waiting queue (vLLM's convention), FCFS within a
priority, and a more urgent request preempting a running less urgent one, which is recomputed later
with every token it had (never lost)."""

import time

from scalellm.engine.request import RequestStatus
from tests.unit.test_scheduler import (assert_all_blocks_free, chunk_sizes, make_request, make_scheduler,
                                       run_to_completion, step)


def add(scheduler, request_id, priority=None, **kwargs):
    request = make_request(request_id, priority=priority, **kwargs)
    request.arrival_time = time.time() + len(scheduler._requests) * 1e-6  # strictly increasing
    scheduler.add_request(request)
    return request


def test_waiting_queue_is_ordered_by_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1)
    for request_id, priority in (("late-none", None), ("low", 5), ("urgent", -1), ("zero", 0), ("urgent-2", -1)):
        add(scheduler, request_id, priority)
    admitted = []
    for _ in range(40):
        output, _ = step(scheduler)
        admitted += [rid for rid in chunk_sizes(output) if rid not in admitted]
        if not scheduler.has_unfinished_requests():
            break
    assert admitted == ["urgent", "urgent-2", "late-none", "zero", "low"]


def test_urgent_request_preempts_a_running_less_urgent_one_which_finishes_later():
    scheduler = make_scheduler(max_num_seqs=2)
    background = [add(scheduler, f"bg{i}", priority=10, max_tokens=8) for i in range(2)]
    step(scheduler)
    step(scheduler)
    assert [r.status for r in background] == [RequestStatus.RUNNING] * 2
    tokens_before = list(background[1].output_token_ids)
    urgent = add(scheduler, "urgent", priority=0, max_tokens=3)
    output, _ = step(scheduler)
    assert output.preempted_request_ids == ["bg1"]  # the least urgent, newest one
    assert set(chunk_sizes(output)) == {"bg0", "urgent"}
    assert background[1].status is RequestStatus.PREEMPTED and background[1].output_token_ids == tokens_before
    updates = run_to_completion(scheduler)
    assert urgent.status is RequestStatus.FINISHED_LENGTH and len(urgent.output_token_ids) == 3
    assert all(r.status is RequestStatus.FINISHED_LENGTH and len(r.output_token_ids) == 8 for r in background)
    assert len(updates["bg1"]) == 8 - len(tokens_before)  # continued where it was, nothing redone twice
    assert_all_blocks_free(scheduler)


def test_equal_or_lower_urgency_never_preempts():
    scheduler = make_scheduler(max_num_seqs=1)
    running = add(scheduler, "first", priority=3, max_tokens=4)
    step(scheduler)
    add(scheduler, "same", priority=3)
    add(scheduler, "lower", priority=7)
    output, _ = step(scheduler)
    assert output.preempted_request_ids == [] and set(chunk_sizes(output)) == {"first"}
    assert running.status is RequestStatus.RUNNING


def test_urgent_request_takes_kv_blocks_from_a_less_urgent_one():
    # 6 blocks of 4 tokens: the background request holds 4 of them, the urgent one needs 3.
    scheduler = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    background = add(scheduler, "bg", priority=1, num_prompt_tokens=14, max_tokens=6)
    step(scheduler)
    urgent = add(scheduler, "urgent", priority=-1, num_prompt_tokens=10, max_tokens=2, first_token_id=500)
    output, _ = step(scheduler)
    assert output.preempted_request_ids == ["bg"] and chunk_sizes(output) == {"urgent": 10}
    run_to_completion(scheduler)
    assert urgent.status is RequestStatus.FINISHED_LENGTH and background.status is RequestStatus.FINISHED_LENGTH
    assert len(background.output_token_ids) == 6
    assert_all_blocks_free(scheduler)


def test_priority_travels_over_the_wire_and_absent_stays_absent():
    from scalellm.protocol.types import SamplingParams
    from scalellm.rpc import convert

    for priority in (None, 0, -7, 2**31 - 1):
        request = convert.encode_request("r", "text", SamplingParams(priority=priority), 0.0)
        decoded = convert.decode_request(convert.pb.GenerateRequest.FromString(request.SerializeToString()))
        assert decoded.params.priority == priority
