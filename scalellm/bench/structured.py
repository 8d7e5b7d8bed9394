"""The structured workload's request fields: ``--response-format``, ``--schema``, ``--tools``.

    --response-format json_schema --schema FILE   response_format {"type": "json_schema",
                                                  "json_schema": {"name", "schema", "strict": true}}
    --response-format json_object                 response_format {"type": "json_object"}
    --tools FILE                                  tools [...] (and tool_choice when FILE gives one)

A schema FILE holds either the JSON Schema itself or OpenAI's wrapper
``{"name": ..., "schema": {...}}``; a tools FILE holds the list of tools, or
``{"tools": [...], "tool_choice": ...}``. The same fields go to every system,
so a structured run compares with the same run without them.
"""

from __future__ import annotations

from pathlib import Path

import orjson

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def read_json(path: Path, what: str):
    try:
        return orjson.loads(Path(path).read_bytes())
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read it ({error.strerror or error})") from None
    except orjson.JSONDecodeError as error:
        raise ValueError(f"{what} {path}: not JSON ({error})") from None


def response_format(kind: str, schema_path: Path | None) -> dict | None:
    """The ``response_format`` field for ``kind`` (None for plain text)."""
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"--response-format must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "json_schema" and schema_path is None:
        raise ValueError("--response-format json_schema needs --schema FILE")
    if kind != "json_schema" and schema_path is not None:
        raise ValueError("--schema goes with --response-format json_schema")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    schema = read_json(schema_path, "--schema")
    if not isinstance(schema, dict):
        raise ValueError(f"--schema {schema_path}: expected a JSON object (a JSON Schema)")
    if "schema" in schema and isinstance(schema["schema"], dict):
        wrapper = {"name": schema.get("name") or Path(schema_path).stem, "schema": schema["schema"],
                   "strict": schema.get("strict", True)}
    else:
        wrapper = {"name": Path(schema_path).stem, "schema": schema, "strict": True}
    return {"type": "json_schema", "json_schema": wrapper}


def tool_fields(tools_path: Path | None) -> dict:
    """``tools`` (and ``tool_choice``) from a tools file; {} without one."""
    if tools_path is None:
        return {}
    data = read_json(tools_path, "--tools")
    fields = {"tools": data} if isinstance(data, list) else data
    tools = fields.get("tools") if isinstance(fields, dict) else None
    if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"--tools {tools_path}: expected a non-empty list of tools, or {{\"tools\": [...]}}")
    return {key: fields[key] for key in ("tools", "tool_choice") if key in fields}


def request_fields(kind: str = "text", schema_path: Path | None = None, tools_path: Path | None = None) -> dict:
    """Every structured field to add to a chat request body."""
    fields = tool_fields(tools_path)
    fmt = response_format(kind, schema_path)
    if fmt is not None:
        fields["response_format"] = fmt
    return fields
