"""The request parsers and the gateway's /openapi.json agree: each body below breaks the document
and the parser refuses it with a 400 naming the field (cases the OpenAPI fuzz found), and each good
body passes both."""

from __future__ import annotations

import json

import jsonschema
import pytest

from scalellm.gateway.openapi import openapi_document
from scalellm.gateway.responses import parse_responses_request
from scalellm.protocol.openai import OpenAIError, parse_chat_request, parse_completion_request

MAX_MODEL_LEN = 64
MESSAGES = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PARSERS = {"/v1/chat/completions": parse_chat_request, "/v1/completions": parse_completion_request,
           "/v1/responses": parse_responses_request}
BASE = {"/v1/chat/completions": {"messages": MESSAGES}, "/v1/completions": {"prompt": "hi"},
        "/v1/responses": {"input": "hi"}}
CHAT, COMPLETIONS, RESPONSES = PARSERS


def _valid_per_document(route: str, body: dict) -> bool:
    document = openapi_document("m", MAX_MODEL_LEN, False)
    schema = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def _json_schema_format(**fields) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, **fields}}


BAD = [
    (CHAT, {"response_format": _json_schema_format(description=5)}, "response_format"),
    (CHAT, {"response_format": _json_schema_format(strict="yes")}, "response_format"),
    (CHAT, {"response_format": _json_schema_format(schema="{}")}, "response_format.json_schema.schema"),
    (CHAT, {"response_format": _json_schema_format(schema=True)}, "response_format.json_schema.schema"),
    (CHAT, {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    (CHAT, {"structured_outputs": {"regex": "a", "json_object": False}}, "structured_outputs"),
    (CHAT, {"structured_outputs": {"json_object": False}}, "structured_outputs"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "strict": "no"}}]}, "tools"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f\n"}}]}, "tools"),
    (CHAT, {"max_tokens": "x", "max_completion_tokens": 5}, "max_tokens"),
    (CHAT, {"max_tokens": 5, "max_completion_tokens": MAX_MODEL_LEN + 1}, "max_completion_tokens"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"temperature": -0.5}, "temperature"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"stop_token_ids": [1 << 32]}, "stop_token_ids"),
    (CHAT, {"seed": -(1 << 63) - 1}, "seed"),  # orjson reads it as the float -2.0**63, in bounds once rounded
    (RESPONSES, {"seed": 1 << 64}, "seed"),
    (COMPLETIONS, {"prompt": [1 << 32]}, "prompt"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"best_of": 2, "n": 2}, "best_of"),
    (RESPONSES, {"input": [{"role": "tool", "content": "x"}]}, "input"),
    (RESPONSES, {"input": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, "input"),
    (RESPONSES, {"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input"),
    (RESPONSES, {"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input"),
    (RESPONSES, {"input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]}, "input"),
    (RESPONSES, {"input": [{"type": "reasoning", "summary": []}]}, "input"),
    (RESPONSES, {"tool_choice": 5}, "tool_choice"),
    (RESPONSES, {"tool_choice": "required"}, "tool_choice"),
    (RESPONSES, {"max_output_tokens": 0}, "max_output_tokens"),
    (RESPONSES, {"max_output_tokens": "9"}, "max_output_tokens"),
    (RESPONSES, {"text": {"format": {"type": "json_schema", "name": "x", "schema": "{}"}}}, "text"),
    (RESPONSES, {"text": {"format": {"type": "json_schema", "schema": {}}}}, "text"),
    (RESPONSES, {"text": {"format": {"type": "xml"}}}, "text"),
    (RESPONSES, {"text": {"format": 1}}, "text"),
    (RESPONSES, {"tools": [{"type": "function", "name": "f", "strict": "x"}]}, "tools"),
]


@pytest.mark.parametrize("route,fields,param", BAD, ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(BAD)])
def test_bodies_the_document_forbids_are_400_naming_the_field(route, fields, param):
    body = {**BASE[route], **fields}
    assert not _valid_per_document(route, body)
    with pytest.raises(OpenAIError) as info:
        PARSERS[route](json.dumps(body).encode(), MAX_MODEL_LEN)
    assert info.value.status == 400 and info.value.param == param, info.value.message


GOOD = [
    (CHAT, {"response_format": _json_schema_format(description=None, strict=None, schema=None)}),
    (CHAT, {"structured_outputs": {"json": '{"type": "object"}', "regex": None}}),
    (CHAT, {"structured_outputs": {"json_object": True}}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f", "description": None, "strict": True}}]}),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "name": None}]}),
    (CHAT, {"max_tokens": 3, "max_completion_tokens": 5, "top_p": 1, "repetition_penalty": 0.5}),
    (CHAT, {"seed": -(1 << 63), "n": 2.0}),
    (COMPLETIONS, {"prompt": [0, (1 << 32) - 1], "best_of": 1, "logprobs": 20}),
    (RESPONSES, {"input": [{"type": "reasoning", "summary": []}, {"role": "user", "content": "hi"}]}),
    (RESPONSES, {"input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}]}],
                 "tool_choice": "auto", "max_output_tokens": MAX_MODEL_LEN}),
    (RESPONSES, {"text": {"format": {"type": "json_schema", "name": "x", "description": None}}}),
]


@pytest.mark.parametrize("route,fields", GOOD)
def test_bodies_the_document_allows_are_parsed(route, fields):
    body = {**BASE[route], **fields}
    assert _valid_per_document(route, body)
    PARSERS[route](json.dumps(body).encode(), MAX_MODEL_LEN)
