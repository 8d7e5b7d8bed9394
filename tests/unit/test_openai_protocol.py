"""OpenAI request parsing (each bad input → 400 and OpenAI's error shape) and response rendering."""

import orjson
import pytest

from scalellm.gateway.rendering import ResponseBuilder, StreamRenderer
from scalellm.protocol.openai import OpenAIError, parse_chat_request, parse_completion_request
from scalellm.protocol.types import ChatPrompt, CompletionOutput, Logprob, RequestOutput

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return orjson.dumps({"model": "m", "messages": USER, **fields})


def completion(**fields):
    return orjson.dumps({"model": "m", "prompt": "hello", **fields})


BAD_CHAT = [
    (b"{not json", None),
    (b"\xff\xfe{}", None),
    (b"[1, 2]", None),
    (orjson.dumps({"model": "m"}), "messages"),
    (orjson.dumps({"model": "m", "messages": []}), "messages"),
    (orjson.dumps({"model": "m", "messages": "hi"}), "messages"),
    (orjson.dumps({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}), "messages"),
    (orjson.dumps({"model": "m", "messages": [{"role": "user"}]}), "messages"),
    (orjson.dumps({"model": "m", "messages": [{"role": "user", "content": 5}]}), "messages"),
    (orjson.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages"),
    (orjson.dumps({"model": "m", "messages": ["hi"]}), "messages"),
    (chat(n=0), "n"),
    (chat(n="2"), "n"),
    (chat(temperature=-1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(max_tokens=-5), "max_tokens"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=10**12), "max_tokens"),
    (chat(max_completion_tokens=1.5), "max_completion_tokens"),
    (chat(top_p=0), "top_p"),
    (chat(stop=[""]), "stop"),
    (chat(stop=5), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream_options={}), "stream_options"),
    (chat(n=2.5), "n"),
    (chat(stop_token_ids=[1.5]), "stop_token_ids"),
    (chat(top_logprobs=3), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=50), "top_logprobs"),
    (chat(model=7), "model"),
    (chat(seed="x"), "seed"),
    (chat(presence_penalty=3), "presence_penalty"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_requests_are_400(body, param):
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(body, 4096)
    error = info.value
    assert error.status == 400 and error.param == param
    shape = orjson.loads(error.body())["error"]
    assert set(shape) == {"message", "type", "param", "code"}
    assert shape["type"] == "invalid_request_error" and shape["message"]


@pytest.mark.parametrize("body", [
    orjson.dumps({"model": "m", "prompt": ""}),
    orjson.dumps({"model": "m", "prompt": ["a", 5]}),
    orjson.dumps({"model": "m", "prompt": [1, -2]}),
    orjson.dumps({"model": "m", "prompt": [1, 2.5]}),
    orjson.dumps({"model": "m", "prompt": [True]}),
    orjson.dumps({"model": "m"}),
    completion(echo=True, logprobs=1),
    completion(suffix=3),
    completion(best_of=3),
    completion(unknown_field=1),
    completion(logprobs=True),
    completion(max_tokens=5000),
])
def test_bad_completion_requests_are_400(body):
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(body, 4096)
    assert info.value.status == 400


def test_chat_request_maps_onto_sampling_params():
    parsed = parse_chat_request(chat(n=2, stop="END", seed=3, max_completion_tokens=20, temperature=0,
                                     logprobs=True, top_logprobs=2, top_k=5, min_p=0.1, ignore_eos=True,
                                     repetition_penalty=1.1, min_tokens=2, skip_special_tokens=False,
                                     stream=True, stream_options={"include_usage": True}), 4096)
    params = parsed.params
    assert isinstance(parsed.prompt, ChatPrompt) and parsed.prompt.messages == USER
    assert (params.n, params.stop, params.seed, params.max_tokens, params.temperature) == (2, ["END"], 3, 20, 0)
    assert (params.logprobs, params.top_k, params.min_p, params.ignore_eos) == (2, 5, 0.1, True)
    assert (params.repetition_penalty, params.min_tokens, params.skip_special_tokens) == (1.1, 2, False)
    assert parsed.stream and parsed.include_usage and parsed.top_logprobs == 2


def test_text_parts_are_joined_and_defaults():
    body = orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}, {"role": "user", "content": "q"}]})
    parsed = parse_chat_request(body, None)
    assert [m["content"] for m in parsed.prompt.messages] == ["ab", "", "q"]
    assert parsed.params.max_tokens is None and parsed.top_logprobs is None and not parsed.stream


def test_integers_in_json_schemas_sense():
    """A float without a fraction is an integer to JSON Schema (and to the published document)."""
    parsed = parse_chat_request(chat(n=2.0, max_tokens=5.0, seed=7.0, stop_token_ids=[3.0]), 4096)
    assert (parsed.params.n, parsed.params.max_tokens, parsed.params.seed) == (2, 5, 7)
    assert parsed.params.stop_token_ids == [3] and all(type(v) is int for v in (parsed.params.n, parsed.params.seed))
    assert parse_completion_request(orjson.dumps({"prompt": [1.0, 2]}), 4096).prompt == [1, 2]


def test_completion_prompt_forms():
    assert parse_completion_request(completion(), 4096).params.max_tokens == 16
    assert parse_completion_request(orjson.dumps({"prompt": [[1, 2, 3]]}), 4096).prompt == [1, 2, 3]
    assert parse_completion_request(orjson.dumps({"prompt": ["x"]}), 4096).prompt == "x"


def _output(index, text, token, finish=None, logprobs=False):
    entries = [{token: Logprob(-0.1, 1, text), 7: Logprob(-2.0, 2, "z")}] if logprobs else None
    return CompletionOutput(index, text, [token], logprobs=entries, finish_reason=finish)


def _events(data: bytes):
    assert data.endswith(b"\n\n")
    return [line[len(b"data: "):] for line in data.split(b"\n\n") if line]


def test_stream_renderer_chat_chunks_and_usage():
    parsed = parse_chat_request(chat(n=2, stream=True, stream_options={"include_usage": True}), 4096)
    renderer = StreamRenderer(parsed, "chatcmpl-1", 123, "m")
    first = _events(renderer.render(RequestOutput("r", [_output(0, "He", 1), _output(1, "Yo", 2)],
                                                  num_prompt_tokens=5)))
    chunks = [orjson.loads(e) for e in first]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""}, {"role": "assistant", "content": ""},
        {"content": "He"}, {"content": "Yo"}]
    assert all(c["id"] == "chatcmpl-1" and c["object"] == "chat.completion.chunk" and c["created"] == 123
               and c["model"] == "m" and c["usage"] is None for c in chunks)
    last = _events(renderer.render(RequestOutput("r", [_output(0, "", 3, "stop"), _output(1, "!", 4, "length")],
                                                 finished=True, num_prompt_tokens=5)))
    assert [orjson.loads(e)["choices"][0] for e in last] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"},
        {"index": 1, "delta": {"content": "!"}, "logprobs": None, "finish_reason": "length"}]
    usage_event, done = _events(renderer.finish())
    assert done == b"[DONE]"
    usage = orjson.loads(usage_event)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 4,
                                                         "total_tokens": 9}


def test_response_builder_completion_logprobs():
    parsed = parse_completion_request(completion(logprobs=1), 4096)
    builder = ResponseBuilder(parsed, "cmpl-1", 5, "m")
    builder.add(RequestOutput("r", [_output(0, "ab", 11, logprobs=True)], num_prompt_tokens=3))
    builder.add(RequestOutput("r", [_output(0, "c", 12, "length", logprobs=True)], finished=True,
                              num_prompt_tokens=3))
    body = orjson.loads(builder.render())
    assert body["object"] == "text_completion" and body["id"] == "cmpl-1"
    choice = body["choices"][0]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"] == {"tokens": ["ab", "c"], "token_logprobs": [-0.1, -0.1],
                                  "top_logprobs": [{"ab": -0.1}, {"c": -0.1}], "text_offset": [0, 2]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_abort_becomes_an_error():
    parsed = parse_chat_request(chat(), 4096)
    builder = ResponseBuilder(parsed, "chatcmpl-1", 5, "m")
    with pytest.raises(OpenAIError) as info:
        builder.add(RequestOutput("r", [_output(0, "x", 1, "abort")], finished=True))
    assert info.value.status == 503
