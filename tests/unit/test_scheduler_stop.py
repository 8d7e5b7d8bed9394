"""Scheduler.update stop conditions: max_tokens, EOS, stop_token_ids, min_tokens, ignore_eos, logprobs."""

from test_scheduler import assert_all_blocks_free, fake_runner_output, make_request, make_scheduler, step

from scalellm.engine.outputs import ModelRunnerOutput
from scalellm.engine.request import RequestStatus
from scalellm.protocol.types import Logprob

EOS = 2


def sequence_runner(token_ids):
    """A token_id function that samples the given tokens in order, per request."""
    def next_token(request):
        return token_ids[request.num_output_tokens]
    return next_token


def generate(token_ids, max_tokens=10, eos_token_id=EOS, **params):
    scheduler = make_scheduler()
    request = make_request("a", max_tokens=max_tokens, eos_token_id=eos_token_id, **params)
    scheduler.add_request(request)
    finish_reasons = []
    while scheduler.has_unfinished_requests():
        _, updates = step(scheduler, sequence_runner(token_ids))
        finish_reasons += [u.finish_reason for u in updates if u.finished]
    assert_all_blocks_free(scheduler)
    return request, finish_reasons


def test_eos_stops_without_stop_reason():
    request, reasons = generate([5, 6, EOS, 8])
    assert request.output_token_ids == [5, 6, EOS]
    assert reasons == ["stop"] and request.status is RequestStatus.FINISHED_STOPPED
    assert request.stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    request, reasons = generate([EOS] * 4, max_tokens=4, ignore_eos=True)
    assert request.output_token_ids == [EOS] * 4 and reasons == ["length"]


def test_stop_token_id_sets_stop_reason():
    request, reasons = generate([5, 9, 6], stop_token_ids=[9, 11])
    assert request.output_token_ids == [5, 9] and reasons == ["stop"]
    assert request.stop_reason == 9


def test_stop_token_ids_apply_even_with_ignore_eos():
    request, _ = generate([5, 9, 6], stop_token_ids=[9], ignore_eos=True)
    assert request.output_token_ids == [5, 9]


def test_min_tokens_defers_eos_and_stop_ids():
    request, _ = generate([EOS, 9, EOS, 5], min_tokens=2, stop_token_ids=[9])
    assert request.output_token_ids == [EOS, 9, EOS]


def test_max_tokens_wins_when_no_stop():
    request, reasons = generate([5] * 10, max_tokens=3)
    assert request.output_token_ids == [5, 5, 5] and reasons == ["length"]
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_stop_on_the_last_allowed_token_is_a_stop():
    request, reasons = generate([5, EOS], max_tokens=2)
    assert reasons == ["stop"]


def test_no_eos_token_means_no_eos_stop():
    request, reasons = generate([EOS] * 3, max_tokens=3, eos_token_id=None)
    assert reasons == ["length"]


def test_logprobs_are_appended_and_reported():
    scheduler = make_scheduler()
    request = make_request("a", max_tokens=1, logprobs=1)
    scheduler.add_request(request)
    output = scheduler.schedule()
    logprobs = {7: Logprob(-0.1, 1), 8: Logprob(-2.5, 2)}
    runner_output = fake_runner_output(output)
    runner_output = ModelRunnerOutput(runner_output.sampled_token_ids, {"a": logprobs})
    (update,) = scheduler.update(output, runner_output)
    assert update.new_logprobs == [logprobs] and request.output_logprobs == [logprobs]
    assert update.finish_reason == "length"
    assert request.last_token_time >= request.first_token_time >= request.scheduled_time > 0


def test_any_of_several_eos_ids_stops():
    scheduler = make_scheduler()
    request = make_request("a", max_tokens=10, eos_token_id=EOS)
    request.other_eos_token_ids = (77,)
    scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        step(scheduler, sequence_runner([5, 77, 6]))
    assert request.output_token_ids == [5, 77]
    assert request.status is RequestStatus.FINISHED_STOPPED and request.stop_reason is None
    assert_all_blocks_free(scheduler)
