"""Mistral: [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...] after any content.

[TOOL_CALLS] is a special token, so requests with tools keep special tokens in the text.
"""

from __future__ import annotations

import json
import re

from scalellm.protocol.tool_parsers.base import Snapshot, ToolParser, function_schema, held_back, parse_call

MARKER = "[TOOL_CALLS]"
_SEPARATOR = re.compile(r"\s*,?\s*")
_EOS = "</s>"


class MistralToolParser(ToolParser):
    name = "mistral"
    keep_special_tokens = True

    def snapshot(self, text: str, final: bool) -> Snapshot:
        text = text.replace(_EOS, "")
        first = text.find(MARKER)
        if first < 0:
            held = 0 if final else max(held_back(text, MARKER), held_back(text, _EOS))
            return Snapshot(text[:len(text) - held])
        snapshot = Snapshot(text[:first])
        position = first + len(MARKER)
        opening = re.compile(r"\s*\[").match(text, position)
        if opening is None:  # a single object without the list's brackets
            opening_end = position
        else:
            opening_end = opening.end()
        position = opening_end
        while position < len(text):
            if text[position:].lstrip().startswith("]"):
                break
            call, end = parse_call(text, position, final)
            if call is not None:
                snapshot.calls.append(call)
            if end is None:
                break
            position = _SEPARATOR.match(text, end).end()
        return snapshot

    def structural_tag(self, tools: list[dict], parallel: bool) -> dict:
        tags = [{"type": "tag", "begin": f'{{"name": {json.dumps(t["function"]["name"])}, "arguments": ',
                 "content": {"type": "json_schema", "json_schema": function_schema(t)}, "end": "}"}
                for t in tools]
        calls = {"type": "tags_with_separator", "tags": tags, "separator": ", ", "at_least_one": True,
                 "stop_after_first": not parallel}
        return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
            {"type": "const_string", "value": MARKER + "["}, calls, {"type": "const_string", "value": "]"}]}}
