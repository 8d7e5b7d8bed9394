"""The OpenAPI schemas of the agent fields (structured outputs, tools) and of /v1/responses.

They state what scalellm/protocol/agent_fields.py and gateway/responses.py enforce, cross-field
rules included, except three that JSON Schema cannot say: a named tool_choice must name one of
`tools`, tool names must differ, and structured_outputs.json given as text must hold a JSON Schema
object. (The rule that response_format and structured_outputs exclude each other is stated, but the
fuzzer's generator does not always honour `not`.) tests/unit/test_document_agreement.py holds
bodies each side must judge alike; an optional field is nullable wherever the parser reads null as
absent.
"""

from __future__ import annotations

from scalellm.protocol.agent_fields import FUNCTION_NAME, IGNORED_FIELDS, ROUTER_FIELDS
from scalellm.protocol.openai import CHAT_ROLES, SAMPLING_FIELDS, STOP_SCHEMA


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_STRING, _OBJECT, _BOOLEAN = {"type": "string"}, {"type": "object"}, {"type": "boolean"}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": _STRING}}
_CONTENT = [_STRING, {"type": "array", "items": _TEXT_PART}]
_NAME = {"type": "string", "pattern": FUNCTION_NAME.pattern, "not": {"pattern": "\n"}}
"""A function name (the `not` refuses a trailing newline, which `$` lets through in Python's regexes)."""
_TOOL_FIELDS = {"description": _nullable(_STRING), "parameters": _nullable(_OBJECT), "strict": _nullable(_BOOLEAN)}


def _present(field: str, schema: dict) -> dict:
    """A body whose `field` is present and matches `schema`."""
    return {"required": [field], "properties": {field: schema}}


def ignored_properties() -> dict:
    """Fields accepted and ignored (IGNORED_FIELDS) whatever their value, each with its reason."""
    return {name: {"description": f"accepted and ignored: {reason}"} for name, reason in IGNORED_FIELDS.items()}


def router_properties() -> dict:
    """SGLang's fields that vllm-router adds to chat and completions requests (ROUTER_FIELDS)."""
    return {name: {"enum": [True, False, None] if only is None else [only, None],
                   "description": f"accepted{'' if only is None else f' only as {str(only).lower()}'}: {reason}"}
            for name, (only, reason) in ROUTER_FIELDS.items()}


def structured_properties() -> dict:
    """response_format, structured_outputs, store and logit_bias (both routes)."""
    json_schema = {"type": "object", "required": ["name"], "properties": {
        "name": _STRING, "schema": _nullable(_OBJECT), "strict": _nullable(_BOOLEAN),
        "description": _nullable(_STRING)}}
    response_format = {"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "text"}}},
        {"type": "object", "required": ["type"], "properties": {"type": {"const": "json_object"}}},
        {"type": "object", "required": ["type", "json_schema"],
         "properties": {"type": {"const": "json_schema"}, "json_schema": json_schema}}]}
    one_of = {"json": {"anyOf": [_OBJECT, {**_STRING, "description": "a JSON Schema object's JSON text"}]},
              "regex": {"type": "string", "minLength": 1},
              "choice": {"type": "array", "minItems": 1, "items": _STRING},
              "grammar": {"type": "string", "minLength": 1}, "json_object": {"const": True}}
    null = {"type": "null"}
    structured = {"oneOf": [{"type": "object", "required": [key], "additionalProperties": False, "properties": {
                      other: schema if other == key else null for other in one_of}} for key, schema in one_of.items()],
                  "description": "vLLM's structured outputs: exactly one non-null constraint"}
    return {"response_format": _nullable(response_format), "structured_outputs": _nullable(structured),
            "store": _nullable({"const": False, "description": "nothing is stored"}),
            "logit_bias": _nullable({"type": "object", "maxProperties": 0})}


def _function_tool() -> dict:
    function = {"type": "object", "required": ["name"], "properties": {"name": _NAME, **_TOOL_FIELDS}}
    return {"type": "object", "required": ["type", "function"],
            "properties": {"type": {"const": "function"}, "function": function}}


def chat_agent_properties() -> dict:
    named = {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                     "properties": {"name": _STRING}}}}
    return {"tools": _nullable({"type": "array", "maxItems": 128, "items": _function_tool()}),
            "tool_choice": _nullable({"anyOf": [{"enum": ["none", "auto", "required"]}, named]}),
            "parallel_tool_calls": _nullable(_BOOLEAN)}


def _forcing_rules(tools_field: str, forced: dict, structured: list[dict]) -> list[dict]:
    """A forcing tool_choice needs tools, and cannot be combined with a structured output."""
    has_tools = _present(tools_field, {"type": "array", "minItems": 1})
    return [{"if": _present("tool_choice", forced), "then": has_tools},
            {"not": {"allOf": [_present("tool_choice", forced), {"anyOf": structured}, has_tools]}}]


def chat_agent_rules() -> list[dict]:
    forced = {"anyOf": [{"const": "required"}, {"type": "object"}]}
    json_format = {"type": "object", "required": ["type"],
                   "properties": {"type": {"enum": ["json_object", "json_schema"]}}}
    structured = [_present("response_format", json_format), _present("structured_outputs", _OBJECT)]
    both = {"not": {"allOf": [_present("response_format", _OBJECT), _present("structured_outputs", _OBJECT)]}}
    return [both, *_forcing_rules("tools", forced, structured)]


def completion_rules() -> list[dict]:
    text_prompt = {"anyOf": [_STRING, {"type": "array", "items": _STRING}]}
    no_suffix = {"anyOf": [{"type": "null"}, {"const": ""}]}
    echo = {"if": _present("echo", {"const": True}), "then": {"properties": {
        "logprobs": {"type": "null"}, "suffix": no_suffix, "prompt": text_prompt}}}
    suffix = {"if": _present("suffix", {"type": "string", "minLength": 1}),
              "then": {"properties": {"prompt": text_prompt}}}
    best_of = {"if": _present("best_of", {"type": "integer"}), "then": {"properties": {
        "best_of": {"const": 1}, "n": {"anyOf": [{"type": "null"}, {"const": 1}]}}}}
    return [echo, suffix, best_of]


def chat_message_schema() -> dict:
    """A chat message: only the assistant may leave content out; a tool message names its call."""
    call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": _STRING, "type": {"const": "function"},
        "function": {"type": "object", "required": ["name", "arguments"],
                     "properties": {"name": _STRING, "arguments": _STRING}}}}
    plain_roles = sorted(CHAT_ROLES - {"assistant", "tool"})
    return {"oneOf": [
        {"type": "object", "required": ["role"], "properties": {
            "role": {"const": "assistant"}, "content": {"anyOf": [*_CONTENT, {"type": "null"}]},
            "tool_calls": _nullable({"type": "array", "items": call}), "name": _nullable(_STRING)}},
        {"type": "object", "required": ["role", "content", "tool_call_id"], "properties": {
            "role": {"const": "tool"}, "content": {"anyOf": _CONTENT}, "tool_call_id": _STRING,
            "name": _nullable(_STRING)}},
        {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string", "enum": plain_roles}, "content": {"anyOf": _CONTENT},
            "name": _nullable(_STRING)}}]}


def chat_message_response() -> dict:
    call = {"type": "object", "required": ["id", "type", "function"], "properties": {
        "id": _STRING, "type": {"const": "function"}, "function": {
            "type": "object", "required": ["name", "arguments"], "properties": {"name": _STRING, "arguments": _STRING}}}}
    return {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
        "reasoning_content": _STRING, "tool_calls": {"type": "array", "items": call}}}


def _responses_request(max_tokens: int, model: str | None) -> dict:
    part = {"type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["input_text", "output_text"]}, "text": _STRING}}
    reasoning = {"type": "object", "required": ["type"], "properties": {"type": {"const": "reasoning"}}}
    items = {"oneOf": [
        {"type": "object", "required": ["role", "content"], "properties": {
            "type": {"const": "message"}, "role": {"enum": ["user", "system", "developer", "assistant"]},
            "content": {"anyOf": [_STRING, {"type": "array", "items": part}]}}},
        {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
            "type": {"const": "function_call"}, "call_id": _STRING, "name": _STRING, "arguments": _STRING}},
        {"type": "object", "required": ["type", "call_id", "output"], "properties": {
            "type": {"const": "function_call_output"}, "call_id": _STRING, "output": _STRING}},
        {**reasoning, "description": "an earlier reply's reasoning: accepted and not replayed to the model"}]}
    tool = {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"const": "function"}, "name": _NAME, **_TOOL_FIELDS}}
    text_format = {"oneOf": [
        {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {"type": "object", "required": ["type", "name"], "properties": {
            "type": {"const": "json_schema"}, "name": _STRING, "schema": _nullable(_OBJECT),
            "strict": _nullable(_BOOLEAN), "description": _nullable(_STRING)}}]}
    named = {"type": "object", "required": ["type", "name"],
             "properties": {"type": {"const": "function"}, "name": _STRING}}
    sampling = {name: _nullable(SAMPLING_FIELDS[name][0]) for name in ("temperature", "top_p", "top_k", "seed")}
    properties = {
        "model": _nullable({"type": "string", "enum": [model]} if model else _STRING),
        "input": {"anyOf": [_STRING, {"type": "array", "items": items, "contains": {"not": reasoning},
                                      "description": "at least one item that is not reasoning"}]},
        "instructions": _nullable(_STRING),
        "max_output_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens}),
        "stop": _nullable(STOP_SCHEMA), **sampling,
        "tools": _nullable({"type": "array", "maxItems": 128, "items": tool}),
        "tool_choice": _nullable({"anyOf": [{"enum": ["none", "auto", "required"]}, named]}),
        "parallel_tool_calls": _nullable(_BOOLEAN),
        "text": _nullable({"type": "object", "properties": {"format": _nullable(text_format)}}),
        "stream": _nullable(_BOOLEAN), "store": _nullable({**_BOOLEAN, "description": "nothing is stored"}),
        "previous_response_id": {"type": "null", "description": "not supported: nothing is stored"},
        "truncation": _nullable({"const": "disabled"}), "include": _nullable({"type": "array", "maxItems": 0}),
        **ignored_properties()}
    forced = {"anyOf": [{"const": "required"}, {"type": "object"}]}
    json_text = _present("text", {"type": "object", "required": ["format"], "properties": {"format": {
        "type": "object", "required": ["type"], "properties": {"type": {"enum": ["json_object", "json_schema"]}}}}})
    return {"type": "object", "required": ["input"], "properties": properties, "additionalProperties": False,
            "allOf": _forcing_rules("tools", forced, [json_text])}


def _response_object() -> dict:
    return {"type": "object", "required": ["id", "object", "created_at", "model", "status", "output"],
            "properties": {"id": _STRING, "object": {"const": "response"}, "created_at": {"type": "integer"},
                           "model": _STRING, "status": {"enum": ["completed", "incomplete"]},
                           "output": {"type": "array", "items": {"type": "object", "required": ["type"]}}}}


def responses_paths(max_tokens: int, model: str | None, operation, json_body, errors, auth: bool) -> dict:
    """The /v1/responses path item (builders passed in from openapi.py)."""
    ok = json_body(_response_object(), "The response (stream=false)")
    event = {"type": "object", "required": ["event", "data"], "description": "a typed event: its type and JSON",
             "properties": {"event": _STRING, "data": _STRING}}
    ok["content"]["text/event-stream"] = {"schema": {"anyOf": [event, {"type": "array", "items": event}]}}
    statuses = ("400", "401", "403", "404", "405", "408", "413", "429", "431", "503", "504")
    return {"/v1/responses": {"post": operation("Response (stateless)", {"200": ok, **errors(*statuses)}, auth,
                                                _responses_request(max_tokens, model))}}
