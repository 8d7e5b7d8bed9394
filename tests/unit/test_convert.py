"""Every project type survives a round trip through the wire format."""

from __future__ import annotations

import math

import pytest

from scalellm.protocol.types import (
    ChatPrompt,
    CompletionOutput,
    EngineHealth,
    EngineLoad,
    Logprob,
    RequestMetrics,
    RequestOutput,
    ResumedSample,
    SamplingParams,
)
from scalellm.rpc import convert


def _wire(message):
    """Serialize and parse again, as gRPC does."""
    return type(message).FromString(message.SerializeToString())


def _round_trip_request(prompt, params):
    request = convert.encode_request("req-1", prompt, params, 1700000000.25)
    return convert.decode_request(_wire(request))


@pytest.mark.parametrize("prompt", ["Hello world", [1, 2, 3, 0], [],
                                    ChatPrompt([{"role": "user", "content": "hi"}], False)])
def test_prompt_round_trip(prompt):
    args = _round_trip_request(prompt, SamplingParams())
    assert args.request_id == "req-1"
    assert args.prompt == prompt
    assert args.gateway_receive_time == 1700000000.25


def test_empty_text_prompt_stays_text():
    assert _round_trip_request("", SamplingParams()).prompt == ""


def test_chat_content_parts_are_joined():
    prompt = ChatPrompt([{"role": "system", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}])
    args = _round_trip_request(prompt, SamplingParams())
    assert args.prompt.messages == [{"role": "system", "content": ""},
                                    {"role": "user", "content": "a\nb"}]
    assert args.prompt.add_generation_prompt is True


def test_chat_image_content_is_rejected():
    prompt = ChatPrompt([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(ValueError, match="text"):
        convert.encode_request("r", prompt, SamplingParams(), 0.0)


def test_default_params_round_trip():
    assert _round_trip_request("x", SamplingParams()).params == SamplingParams()


def test_all_params_round_trip():
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=-7,
                            repetition_penalty=1.1, presence_penalty=-0.5, frequency_penalty=1.5,
                            stop=["\n\n", "END"], stop_token_ids=[2, 7], include_stop_str_in_output=True,
                            ignore_eos=True, max_tokens=None, min_tokens=4, logprobs=5,
                            skip_special_tokens=False)
    assert _round_trip_request("x", params).params == params


@pytest.mark.parametrize("field", ["seed", "max_tokens", "logprobs"])
def test_optional_zero_is_not_none(field):
    value = 0 if field != "max_tokens" else 1
    params = SamplingParams(**{field: value})
    assert getattr(_round_trip_request("x", params).params, field) == value
    params = SamplingParams(**{field: None})
    assert getattr(_round_trip_request("x", params).params, field) is None


def test_resumed_samples_round_trip():
    resumed = [ResumedSample(0, (5, 6, 7), -3.25), ResumedSample(2, (), None), ResumedSample(3, (1,), 0.0)]
    request = convert.encode_request("r", "x", SamplingParams(n=4), 0.0, resumed)
    assert convert.decode_request(_wire(request)).resumed_samples == resumed
    assert convert.decode_request(_wire(convert.encode_request("r", "x", SamplingParams(), 0.0))).resumed_samples == []


def test_missing_prompt_is_a_value_error():
    request = convert.encode_request("r", "x", SamplingParams(), 0.0)
    request.ClearField("text")
    with pytest.raises(ValueError, match="no prompt"):
        convert.decode_request(request)


def test_invalid_params_are_a_value_error():
    request = convert.encode_request("r", "x", SamplingParams(), 0.0)
    request.params.n = 0
    with pytest.raises(ValueError, match="n must be"):
        convert.decode_request(_wire(request))


def _round_trip_output(output, first=True):
    chunk = _wire(convert.encode_output(output, 5, first=first))
    assert convert.num_generated_tokens(chunk) == 5
    return convert.decode_output(output.request_id, chunk)


def test_running_delta_round_trip():
    output = RequestOutput("r", [CompletionOutput(0, " tok", [17])], num_prompt_tokens=3)
    assert _round_trip_output(output) == output


def test_final_output_round_trip_with_logprobs_and_metrics():
    logprobs = [{5: Logprob(-0.25, 1, "a"), 9: Logprob(-1.5, 2, None)},
                {6: Logprob(-math.inf, 3, "b")}]
    output = RequestOutput(
        "r",
        [CompletionOutput(0, "ab", [5, 6], -1.75, logprobs, "stop", "END"),
         CompletionOutput(1, "", [], 0.0, [], "length", None),
         CompletionOutput(2, "x", [3], None, None, "stop", 0),
         CompletionOutput(3, "", [], None, None, "abort", None)],
        finished=True, prompt="hi there", prompt_token_ids=[1, 2], num_prompt_tokens=2,
        metrics=RequestMetrics(1.5, 2.25, 3.0, 4.125, 5.5, num_cached_tokens=16))
    assert _round_trip_output(output) == output


def test_prompt_is_sent_on_first_chunk_only():
    output = RequestOutput("r", [], prompt="p", prompt_token_ids=[1], num_prompt_tokens=1)
    decoded = _round_trip_output(output, first=False)
    assert decoded.prompt is None and decoded.prompt_token_ids == []
    assert decoded.num_prompt_tokens == 1


@pytest.mark.parametrize("health", [EngineHealth(True), EngineHealth(False, "step loop stalled")])
def test_health_round_trip(health):
    assert convert.decode_health(_wire(convert.encode_health(health))) == health


def test_load_round_trip():
    load = EngineLoad(3, 4, 100, 256, 2**33, 10**12, 5, 6)
    assert convert.decode_load(_wire(convert.encode_load(load))) == load
    assert convert.decode_load(_wire(convert.encode_load(EngineLoad(0, 0, 0, 0, 0)))) == \
        EngineLoad(0, 0, 0, 0, 0)


def test_info_round_trip():
    info = ("smollm2", 8192, "quantization gguf, dtype bfloat16")
    assert convert.decode_info(_wire(convert.encode_info(*info))) == info


def test_method_paths():
    assert convert.SESSION.path == "/scalellm.v1.Replica/Session"
    assert {m.name for m in (convert.HEALTH, convert.LOAD, convert.INFO)} == {"Health", "Load", "Info"}
