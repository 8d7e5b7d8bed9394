"""Request fields for agents: response_format, vLLM's structured_outputs, tools and tool_choice,
and the rule that no field is silently ignored.

Each parser raises `OpenAIError` (400, naming the field) for bad input. Schemas, regexes and
grammars are compiled by the replica (xgrammar), which answers 400 for those that do not compile.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from scalellm.protocol.tool_parsers import ToolParser
from scalellm.protocol.types import StructuredOutput

IGNORED_FIELDS = {
    "user": "an end-user id for the provider's abuse monitoring; nothing here uses it",
    "safety_identifier": "the newer name of 'user'",
    "prompt_cache_key": "a cache-routing hint; the gateway routes by prefix affinity on its own",
    "service_tier": "one tier is served",
    "metadata": "tags for stored completions; nothing is stored",
}
"""Fields accepted and ignored, with the reason (the README lists them)."""
ROUTER_FIELDS = {
    "include_reasoning": (None, "no reasoning parser runs here: a model's text is all content"),
    "separate_reasoning": (None, "no reasoning parser runs here: a model's text is all content"),
    "stream_reasoning": (None, "no reasoning parser runs here: a model's text is all content"),
    "no_stop_trim": (False, "stop strings are trimmed from the text, as in OpenAI's API"),
    "continue_final_message": (False, "a chat always starts a new assistant turn"),
    "return_hidden_states": (False, "no hidden states are returned"),
}
"""SGLang's request fields, which vllm-router adds to every chat and completions request it forwards:
name -> (the one value accepted besides null, or None for any boolean; the reason)."""
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
"""A function's name (the document publishes the pattern; match it with `fullmatch`: Python's `$` also
matches before a trailing newline)."""
TOOL_CHOICES = ("none", "auto", "required")
STRUCTURED_OUTPUT_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                          "json_object": "json_object"}


def _invalid(message: str, param: str):
    from scalellm.protocol.openai import OpenAIError

    return OpenAIError(400, message, param=param)


def check_known_fields(body: dict, known: frozenset[str], route: str) -> None:
    """400 naming the first field that is neither honoured nor in IGNORED_FIELDS."""
    for name in body:
        if name in ROUTER_FIELDS:
            only, reason = ROUTER_FIELDS[name]
            value = expect(body[name], "boolean", name, name)
            if only is not None and value not in (None, only):
                raise _invalid(f"'{name}' is accepted only as {str(only).lower()} or null: {reason}", name)
        elif name not in known and name not in IGNORED_FIELDS:
            raise _invalid(f"'{name}' is not supported by {route}; remove it (this server refuses fields it "
                           "would otherwise ignore)", name)
    if body.get("store") is not None and body["store"] is not False:
        raise _invalid("'store' must be false or null: this server stores no completions", "store")
    if body.get("logit_bias") is not None and body["logit_bias"] != {}:
        raise _invalid("'logit_bias' is not supported (only {} or null); use structured_outputs or stop_token_ids",
                       "logit_bias")


_JSON_TYPES = {"string": ((str,), "a string"), "integer": ((int,), "an integer"),
               "number": ((int, float), "a number"), "boolean": ((bool,), "a boolean"),
               "array": ((list,), "a list"), "object": ((dict,), "an object")}
_ROUNDED = float(1 << 63)
"""orjson reads an integer literal beyond 64 bits as a float, rounded: from this magnitude on, a float may
stand for an integer out of a field's bounds (a seed of -2**63 - 1 reads as -2.0**63)."""


def as_integer(value) -> int | None:
    """`value` as an int when it is an integer in JSON Schema's sense (a float without fraction counts,
    below the magnitude where orjson's rounding hides the literal), else None."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer() and -_ROUNDED < value < _ROUNDED:
        return int(value)
    return None


def expect(value, kind: str, where: str, param: str, nullable: bool = True):
    """`value` when it has the JSON type `kind` ("string", "integer", "number", "boolean", "array",
    "object"), or null when `nullable`; else a 400 naming `param` (`where` locates the value in the body).
    As in JSON Schema, a bool is not a number and a float without a fraction is an integer (returned as int)."""
    if value is None and nullable:
        return None
    if kind == "integer" and (integer := as_integer(value)) is not None:
        return integer
    types, what = _JSON_TYPES[kind]
    if not isinstance(value, types) or isinstance(value, bool) and kind != "boolean":
        got = "null" if value is None else type(value).__name__
        raise _invalid(f"'{where}' must be {what}{' or null' if nullable else ''}, got {got}", param)
    return value


def _schema_text(schema, where: str, param: str, text: bool = False) -> str:
    """A JSON Schema object as text; `text`: a JSON string holding one is taken too (vLLM's
    structured_outputs.json)."""
    if text and isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise _invalid(f"invalid json_schema: '{where}' is not valid JSON: {exc}", param) from None
        if not isinstance(schema, dict):
            raise _invalid(f"invalid json_schema: '{where}' must hold a JSON Schema object", param)
    if not isinstance(schema, dict):
        raise _invalid(f"'{where}' must be a JSON Schema object{' (or its JSON text)' if text else ''}", param)
    return json.dumps(schema)


def parse_response_format(body: dict) -> StructuredOutput | None:
    """OpenAI's response_format: text, json_object, or json_schema {name, schema, strict}."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise _invalid("'response_format.type' must be 'text', 'json_object' or 'json_schema'", "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _invalid("'response_format.json_schema' must be an object with a 'name' and a 'schema'",
                       "response_format")
    expect(spec.get("description"), "string", "response_format.json_schema.description", "response_format")
    expect(spec.get("strict"), "boolean", "response_format.json_schema.strict", "response_format")
    schema = spec.get("schema")
    schema = {} if schema is None else schema
    return StructuredOutput("json_schema", _schema_text(schema, "response_format.json_schema.schema",
                                                        "response_format.json_schema.schema"))


def parse_structured_outputs(body: dict) -> StructuredOutput | None:
    """vLLM's structured_outputs: exactly one of json, regex, choice, grammar, json_object."""
    value = body.get("structured_outputs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid("'structured_outputs' must be an object", "structured_outputs")
    unknown = [key for key in value if key not in STRUCTURED_OUTPUT_KEYS]
    if unknown:
        raise _invalid(f"'structured_outputs.{unknown[0]}' is not supported; use one of "
                       f"{', '.join(STRUCTURED_OUTPUT_KEYS)}", "structured_outputs")
    given = [key for key in STRUCTURED_OUTPUT_KEYS if value.get(key) is not None]
    if len(given) != 1:
        raise _invalid("'structured_outputs' takes exactly one non-null of " + ", ".join(STRUCTURED_OUTPUT_KEYS),
                       "structured_outputs")
    key = given[0]
    spec = value[key]
    if key == "json":
        return StructuredOutput("json_schema", _schema_text(spec, "structured_outputs.json", "structured_outputs",
                                                            text=True))
    if key == "json_object":
        if spec is not True:
            raise _invalid("'structured_outputs.json_object' must be true", "structured_outputs")
        return StructuredOutput("json_object")
    if key == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise _invalid("'structured_outputs.choice' must be a non-empty list of strings", "structured_outputs")
        return StructuredOutput("choice", json.dumps(spec))
    if not isinstance(spec, str) or not spec:
        raise _invalid(f"'structured_outputs.{key}' must be a non-empty string", "structured_outputs")
    return StructuredOutput(STRUCTURED_OUTPUT_KEYS[key], spec)


@dataclass
class ToolRequest:
    """The request's tools and how the model must use them."""

    tools: list[dict]
    choice: str
    """"none", "auto", "required" or "named"."""
    named: str | None
    parallel: bool

    def forced(self, parser: ToolParser) -> StructuredOutput | None:
        """The structural tag that forces calls ("required" or a named function), else None."""
        if self.choice not in ("required", "named"):
            return None
        tools = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.named]
        return StructuredOutput("structural_tag", json.dumps(parser.structural_tag(tools, self.parallel)))

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"


def _tool(tool, index: int) -> dict:
    where = f"tools[{index}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise _invalid(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}} (only function tools "
                       "are supported)", "tools")
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
        raise _invalid(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-'", "tools")
    for field, kind in (("parameters", "object"), ("description", "string"), ("strict", "boolean")):
        expect(function.get(field), kind, f"{where}.function.{field}", "tools")
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _tool_choice(value, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if value in TOOL_CHOICES:
        if value == "required" and not names:
            raise _invalid("'tool_choice': 'required' needs 'tools'", "tool_choice")
        return value, None
    function = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise _invalid("'tool_choice' must be 'none', 'auto', 'required' or "
                       '{"type": "function", "function": {"name": ...}}', "tool_choice")
    if name not in names:
        raise _invalid(f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
    return "named", name


def parse_tools(body: dict) -> ToolRequest | None:
    """tools, tool_choice and parallel_tool_calls; None when the request has no tools."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or len(tools) > 128):
        raise _invalid("'tools' must be a list of at most 128 function tools", "tools")
    tools = [_tool(tool, i) for i, tool in enumerate(tools or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise _invalid("'tools' names a function more than once", "tools")
    choice, named = _tool_choice(body.get("tool_choice"), names)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool) and parallel is not None:
        raise _invalid("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if not tools:
        return None
    return ToolRequest(tools, choice, named, parallel is not False)


def message_tool_fields(message: dict, index: int) -> dict:
    """An assistant message's tool_calls and a tool message's tool_call_id, checked."""
    fields = {}
    calls = message.get("tool_calls")
    if calls is not None and message.get("role") == "assistant":
        if not isinstance(calls, list):
            raise _invalid(f"messages[{index}].tool_calls must be a list", "messages")
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                    or not isinstance(function.get("arguments"), str) or not isinstance(call.get("id"), str)
                    or call.get("type") != "function"):
                raise _invalid(f"messages[{index}].tool_calls entries need an id, type 'function', function.name "
                               "and function.arguments (a JSON string)", "messages")
        if calls:
            fields["tool_calls"] = calls
    if message.get("role") == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise _invalid(f"messages[{index}].tool_call_id is required for role 'tool'", "messages")
        fields["tool_call_id"] = call_id
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _invalid(f"messages[{index}].name must be a string", "messages")
        fields["name"] = name
    return fields
