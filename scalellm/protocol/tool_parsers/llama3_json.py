"""Llama 3.x JSON tool calls: the reply is {"name": "f", "parameters": {...}}, several joined by "; ".

A reply whose first non-blank character is not "{" is plain content (an optional <|python_tag|>
before the JSON is skipped).
"""

from __future__ import annotations

import json
import re

from scalellm.protocol.tool_parsers.base import Snapshot, ToolParser, function_schema, parse_call

PYTHON_TAG = "<|python_tag|>"
_SEPARATOR = re.compile(r"\s*;?\s*")


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def snapshot(self, text: str, final: bool) -> Snapshot:
        stripped = text.lstrip()
        if stripped.startswith(PYTHON_TAG):
            stripped = stripped[len(PYTHON_TAG):].lstrip()
        elif PYTHON_TAG.startswith(stripped) and not final:
            return Snapshot()  # too early to tell content from a call
        if not stripped and not final:
            return Snapshot()
        if not stripped.startswith("{"):
            return Snapshot(text)
        snapshot, position = Snapshot(), 0
        while position < len(stripped):
            call, end = parse_call(stripped, position, final)
            if call is not None:
                snapshot.calls.append(call)
            if end is None:
                break
            position = _SEPARATOR.match(stripped, end).end()
        return snapshot

    def structural_tag(self, tools: list[dict], parallel: bool) -> dict:
        tags = [{"type": "tag", "begin": f'{{"name": {json.dumps(t["function"]["name"])}, "parameters": ',
                 "content": {"type": "json_schema", "json_schema": function_schema(t)}, "end": "}"}
                for t in tools]
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "; ",
                                                     "at_least_one": True, "stop_after_first": not parallel}}
