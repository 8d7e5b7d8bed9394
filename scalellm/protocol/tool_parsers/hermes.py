"""Qwen2.5 and Hermes: <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>, one block per call.

Text before the first block is content; text after it (the newlines between blocks, anything the
model adds) is dropped, as the format has no room for content after calls.
"""

from __future__ import annotations

import json

from scalellm.protocol.tool_parsers.base import Snapshot, ToolParser, function_schema, held_back, parse_call

BEGIN, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def snapshot(self, text: str, final: bool) -> Snapshot:
        first = text.find(BEGIN)
        if first < 0:
            return Snapshot(text if final else text[:len(text) - held_back(text, BEGIN)])
        snapshot = Snapshot(text[:first])
        position = first
        while position >= 0:
            body_start = position + len(BEGIN)
            end = text.find(END, body_start)
            body = text[body_start:] if end < 0 else text[body_start:end]
            call, _ = parse_call(body, 0, final or end >= 0)
            if call is not None:
                snapshot.calls.append(call)
            if end < 0:
                break
            position = text.find(BEGIN, end + len(END))
        return snapshot

    def structural_tag(self, tools: list[dict], parallel: bool) -> dict:
        tags = [{"type": "tag", "begin": f'{BEGIN}\n{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                 "content": {"type": "json_schema", "json_schema": function_schema(t)}, "end": f"}}\n{END}"}
                for t in tools]
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                                                     "at_least_one": True, "stop_after_first": not parallel}}
