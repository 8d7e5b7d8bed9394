"""The API agents use, through the official clients, against `scalellm serve` on Qwen2.5-Coder-1.5B
(a quantized GGUF whose chat template renders tools): structured outputs, tool calling with each
tool_choice, streamed and not, the Responses API, LangChain, and a two-turn tool loop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import openai
import pytest
from pydantic import BaseModel

from scalellm.process import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FETCH = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "models", "fetch.sh")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


class City(BaseModel):
    name: str
    country: str


def _model_path() -> str:
    if not os.path.exists(FETCH):
        pytest.skip("the shared model cache is not available")
    result = subprocess.run(["bash", FETCH, "qwen2.5-coder-1.5b"], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip(f"Qwen2.5-Coder-1.5B is not available: {result.stderr.strip()[-200:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server():
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "scalellm.cli", "serve", _model_path(), "--replicas", "1", "--kv-cache-gib", "0.25",
         "--max-model-len", "2048", "--port", str(port), "--no-request-log"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = process.stdout.readline()
    if "ScaleLLM serving" not in banner:
        process.kill()
        raise AssertionError(f"serve did not start (exit code {process.wait()}): {banner!r}")
    assert re.search(r"; quantization (gguf|none), dtype \w+, kv cache \w+\)$", banner.strip()), banner  # what auto picked
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    yield client, port, client.models.list().data[0].id
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def test_parse_returns_a_valid_pydantic_instance(server):
    client, _, model = server
    reply = client.chat.completions.parse(model=model, response_format=City, max_tokens=40, temperature=0,
                                          messages=[{"role": "user", "content": "Which city is the Eiffel Tower in?"}])
    assert isinstance(reply.choices[0].message.parsed, City)
    assert reply.choices[0].finish_reason == "stop"


def test_forced_tool_calls_parse_streamed_or_not(server):
    client, _, model = server
    for choice, stream in (("required", False), ({"type": "function", "function": {"name": "get_time"}}, True)):
        kwargs = dict(model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=40,
                      temperature=0, parallel_tool_calls=False)
        if stream:
            calls, finish = _assemble(client.chat.completions.create(stream=True, **kwargs))
        else:
            reply = client.chat.completions.create(**kwargs)
            finish = reply.choices[0].finish_reason
            calls = [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls]
        assert finish == "tool_calls" and len(calls) == 1
        assert calls[0][0] == ("get_time" if isinstance(choice, dict) else calls[0][0])
        assert isinstance(json.loads(calls[0][1])["city"], str)


def _assemble(chunks) -> tuple[list[tuple[str, str]], str]:
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        delta = chunk.choices[0].delta
        for call in delta.tool_calls or []:
            if call.id is not None:
                calls[call.index] = [call.function.name, ""]
            calls[call.index][1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [tuple(calls[i]) for i in sorted(calls)], finish


def test_auto_and_none(server):
    client, _, model = server
    auto = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0)
    message = auto.choices[0].message
    if message.tool_calls:  # the model chose to call: what it wrote parsed into a call
        assert auto.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == "get_weather"
    else:
        assert message.content
    none = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_two_turn_tool_loop(server):
    client, _, model = server
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           max_tokens=40, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    city = json.loads(call.function.arguments)["city"]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": f"Sunny and 31 degrees in {city}."}]
    second = client.chat.completions.create(model=model, messages=history, max_tokens=30, temperature=0)
    answer = second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None and answer, answer  # the model answers in words
    assert second.choices[0].finish_reason in ("stop", "length")


def test_responses_create_and_stream(server):
    client, _, model = server
    tool = {"type": "function", **WEATHER["function"]}
    called = client.responses.create(model=model, input=ASK[0]["content"], tools=[tool], tool_choice="required",
                                     max_output_tokens=40, temperature=0)
    call = [item for item in called.output if item.type == "function_call"][0]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    # Room to finish: the stream ends in response.completed, whose text is the deltas'.
    with client.responses.stream(model=model, input="Say hello.", instructions="Answer in three words.",
                                 max_output_tokens=64, temperature=0) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas and "".join(deltas) == final.output_text and final.status == "completed"
    # Cut short: response.incomplete, with the reason, as OpenAI ends such a stream (the SDK's
    # get_final_response takes only response.completed, so the events are read as they come).
    with client.responses.stream(model=model, input="Say hello.", max_output_tokens=2, temperature=0) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.usage.output_tokens == 2 and last.response.output_text
    with pytest.raises(openai.BadRequestError, match="stores no responses"):
        client.responses.create(model=model, input="hi", previous_response_id="resp_123")


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.tools import tool

    client, port, model = server

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"sunny in {city}"

    chat = langchain_openai.ChatOpenAI(model=model, base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                       temperature=0, max_tokens=40, max_retries=0)
    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(ASK[0]["content"])
    assert message.tool_calls and get_weather.invoke(message.tool_calls[0]["args"]).startswith("sunny in")
    city = chat.with_structured_output(City).invoke("Which city is the Colosseum in?")
    assert isinstance(city, City)


def test_bad_grammars_are_400_and_the_server_keeps_serving(server):
    client, _, model = server
    bad = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
               "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}},
           {"extra_body": {"structured_outputs": {"regex": "(unclosed"}}},
           {"extra_body": {"structured_outputs": {"grammar": "root ::= undefined_rule"}}}]
    for kwargs in bad:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=model, messages=ASK, max_tokens=4, **kwargs)
    long = client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0,
                                          extra_body={"structured_outputs": {"regex": "a{40}"}})
    assert long.choices[0].finish_reason == "length" and set(long.choices[0].message.content) == {"a"}
