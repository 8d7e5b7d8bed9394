"""Agent request fields: each bad input is a 400 naming the field; good ones map onto the engine's types."""

from __future__ import annotations

import json

import orjson
import pytest

from scalellm.gateway.rendering import ResponseBuilder, StreamRenderer
from scalellm.gateway.responses import ResponsesRenderer, parse_responses_request
from scalellm.protocol.openai import OpenAIError, parse_chat_request, parse_completion_request
from scalellm.protocol.types import CompletionOutput, InfillPrompt, RequestOutput

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> bytes:
    return orjson.dumps({"model": "m", "messages": MESSAGES, **fields})


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{bad"}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"guided": "x"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"frobnicate": True}, "frobnicate"),
    ({"store": True}, "store"),
    ({"logit_bias": {"5": 1}}, "logit_bias"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "name": {"a": 1}}]}, "messages"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}]}, "messages"),
    ({"no_stop_trim": True}, "no_stop_trim"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"include_reasoning": "yes"}, "include_reasoning"),
])
def test_bad_agent_fields_are_400_naming_the_field(fields, param):
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(chat(**fields), 4096)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_the_fields_vllm_router_adds_are_accepted_at_its_defaults():
    router = {"no_stop_trim": False, "continue_final_message": False, "include_reasoning": True,
              "separate_reasoning": True, "stream_reasoning": True, "return_hidden_states": False}
    assert parse_chat_request(chat(**router), 4096).params.max_tokens is None
    assert parse_completion_request(orjson.dumps({"prompt": "a", **router}), 4096).prompt == "a"


def test_structured_fields_map_onto_the_engine():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = parse_chat_request(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}), 4096)
    assert parsed.params.structured.kind == "json_schema" and json.loads(parsed.params.structured.spec) == schema
    parsed = parse_chat_request(chat(structured_outputs={"choice": ["a", "b"]}, user="u1"), 4096)
    assert parsed.params.structured.kind == "choice" and parsed.tool_parser is None


def test_forced_tools_become_a_structural_tag_and_history_passes_through():
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    parsed = parse_chat_request(chat(messages=history, tools=[TOOL], tool_choice="required",
                                     parallel_tool_calls=False), 4096)
    assert parsed.params.structured.kind == "structural_tag"
    assert '"stop_after_first": true' in parsed.params.structured.spec
    assert parsed.prompt.tools == [TOOL] and parsed.prompt.messages[1]["tool_calls"][0]["id"] == "c1"
    assert parsed.prompt.messages[2]["tool_call_id"] == "c1"
    assert parse_chat_request(chat(tools=[TOOL]), 4096).params.structured is None  # auto: the model chooses
    assert parse_chat_request(chat(tools=[TOOL], tool_choice="none"), 4096).tool_parser is None


def test_completions_prompt_list_echo_and_suffix():
    parsed = parse_completion_request(orjson.dumps({"prompt": ["a", "b", "c"], "n": 2, "echo": True}), 4096)
    assert parsed.prompt == "a" and parsed.extra_prompts == ["b", "c"] and parsed.echo
    parsed = parse_completion_request(orjson.dumps({"prompt": "def f(", "suffix": "\n    return 1"}), 4096)
    assert parsed.prompt == InfillPrompt("def f(", "\n    return 1")
    with pytest.raises(OpenAIError, match="suffix"):
        parse_completion_request(orjson.dumps({"prompt": [1, 2], "suffix": "x"}), 4096)


def _output(text: str, finish: str | None = None, index: int = 0) -> RequestOutput:
    return RequestOutput("r", [CompletionOutput(index, text, [1] * max(1, len(text) // 4), finish_reason=finish)],
                         num_prompt_tokens=5)


def test_tool_calls_render_the_same_streamed_and_whole():
    parsed = parse_chat_request(chat(tools=[TOOL], stream=True), 4096)
    pieces = ["<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}\n</tool_call>']
    renderer = StreamRenderer(parsed, "id", 0, "m")
    events = b"".join(renderer.render(_output(p)) for p in pieces[:-1]) + renderer.render(_output(pieces[-1], "stop"))
    chunks = [orjson.loads(line[6:]) for line in events.split(b"\n\n") if line.startswith(b"data: {")]
    arguments = "".join(c["choices"][0]["delta"].get("tool_calls", [{}])[0].get("function", {}).get("arguments", "")
                        for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and json.loads(arguments) == {"city": "Paris"}
    builder = ResponseBuilder(parsed, "id", 0, "m")
    for piece in pieces[:-1]:
        builder.add(_output(piece))
    builder.add(_output(pieces[-1], "stop"))
    choice = orjson.loads(builder.render())["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == arguments


def test_responses_map_onto_chat_and_render_items():
    parsed = parse_responses_request(orjson.dumps({
        "input": [{"role": "user", "content": "weather?"},
                  {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
        "instructions": "be brief", "tools": [{"type": "function", "name": "get_weather"}],
        "max_output_tokens": 20, "stream": True}), 4096)
    roles = [m["role"] for m in parsed.prompt.messages]
    assert roles == ["system", "user", "assistant", "tool"] and parsed.params.max_tokens == 20
    renderer = ResponsesRenderer(parsed, "resp_1", 0, "m")
    events = renderer.render(_output("<think>hm</think>Hello")) + renderer.render(_output(" there", "stop"))
    events += renderer.finish()
    kinds = [line[7:] for line in events.decode().split("\n") if line.startswith("event: ")]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    final = orjson.loads(events.split(b"\n\n")[-2].split(b"data: ", 1)[1])["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][1]["content"][0]["text"] == "Hello there"
    with pytest.raises(OpenAIError, match="stores no responses"):
        parse_responses_request(orjson.dumps({"input": "x", "previous_response_id": "resp_0"}), 4096)
