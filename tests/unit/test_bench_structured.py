"""The structured workload's request fields (--response-format, --schema, --tools)."""

from __future__ import annotations

import json

import orjson
import pytest

from scalellm.bench import structured
from scalellm.bench.client import ClientConfig, build_body
from scalellm.bench.datasets import RequestSpec

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_json_schema_from_a_bare_schema_or_openai_wrapper(tmp_path):
    bare = tmp_path / "person.json"
    bare.write_text(json.dumps(SCHEMA))
    assert structured.response_format("json_schema", bare) == {
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"name": "record", "schema": SCHEMA, "strict": False}))
    assert structured.response_format("json_schema", wrapped)["json_schema"] == {
        "name": "record", "schema": SCHEMA, "strict": False}
    assert structured.response_format("json_object", None) == {"type": "json_object"}
    assert structured.response_format("text", None) is None


@pytest.mark.parametrize("kind, content, message", [
    ("json_schema", None, "needs --schema"),
    ("json_schema", "{not json", "not JSON"),
    ("json_schema", "[1, 2]", "expected a JSON object"),
    ("text", "{}", "goes with --response-format json_schema"),
])
def test_bad_schema_options_are_clear_errors(tmp_path, kind, content, message):
    path = None
    if content is not None:
        path = tmp_path / "s.json"
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        structured.response_format(kind, path)
    with pytest.raises(ValueError, match="cannot read"):
        structured.response_format("json_schema", tmp_path / "missing.json")


def test_tools_from_a_list_or_an_object(tmp_path):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    listed = tmp_path / "tools.json"
    listed.write_text(json.dumps(tools))
    assert structured.tool_fields(listed) == {"tools": tools}
    chosen = tmp_path / "chosen.json"
    chosen.write_text(json.dumps({"tools": tools, "tool_choice": "required", "other": 1}))
    assert structured.tool_fields(chosen) == {"tools": tools, "tool_choice": "required"}
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="non-empty list"):
        structured.tool_fields(empty)
    assert structured.tool_fields(None) == {}


def test_fields_go_into_every_chat_body(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    extra = structured.request_fields("json_schema", schema)
    body = orjson.loads(build_body(RequestSpec(prompt="hi"), ClientConfig("http://x", "m", extra_fields=extra)))
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["max_tokens"] == 64
