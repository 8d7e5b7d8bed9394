"""The tool-call parser interface, and the JSON scanning its implementations share.

A parser reads the text a model wrote so far and returns a `Snapshot`: the plain content that is
certain so far and the tool calls begun so far (name, and the arguments' text written so far). A
snapshot of a longer text only ever extends the snapshot of its prefix (content and arguments grow
at their ends, calls are appended), so streaming is the difference between consecutive snapshots
(see scalellm/protocol/choice_stream.py), and the calls a client assembles cannot depend on how the
text was chunked: they are the snapshot of the whole text.

Each family also says how to force calls (tool_choice "required" or a named function): an xgrammar
structural tag whose output the same parser reads back.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class ParsedCall:
    """One tool call as written so far."""

    name: str
    arguments: str
    """The arguments' JSON text so far (complete once the call's block closed)."""


@dataclass
class Snapshot:
    """What the text so far says for certain: content and calls only ever grow."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolParser(ABC):
    """One model family's tool-call syntax. Stateless: `snapshot` is a pure function of the text."""

    name: str = ""
    keep_special_tokens: bool = False
    """True when the syntax uses special tokens the detokenizer would otherwise drop."""

    @abstractmethod
    def snapshot(self, text: str, final: bool) -> Snapshot:
        """Content and calls in `text`; `final` when no more text will come (nothing is held back)."""

    @abstractmethod
    def structural_tag(self, tools: list[dict], parallel: bool) -> dict:
        """An xgrammar structural tag that admits only calls of `tools` (at least one; one when not
        `parallel`) in this family's syntax."""


def function_schema(tool: dict) -> dict:
    """A tool's parameters schema (an object of anything when it gives none)."""
    return tool["function"].get("parameters") or {"type": "object"}


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker` (kept back while streaming)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def scan_json_value(text: str, start: int) -> tuple[int, bool]:
    """From `start`, the end of the JSON value scanned so far and whether it is complete.

    Leading whitespace is skipped; objects and arrays are tracked by depth with strings and escapes
    respected, so a brace inside a string does not count. A scalar counts as complete only at a
    delimiter that follows it.
    """
    i, depth, in_string, escaped = start, 0, False, False
    while i < len(text) and text[i].isspace():
        i += 1
    begin = i
    while i < len(text):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return i + 1, True
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1, depth == 0
        elif depth == 0 and (ch.isspace() or ch in ",;"):
            return i, i > begin
        i += 1
    return i, False


def parse_call(text: str, start: int, final: bool) -> tuple[ParsedCall | None, int | None]:
    """A call object {"name": ..., "arguments"|"parameters": {...}} at `start`: the call so far and
    the index after its closing brace (None while it is open). A call with its keys in another order
    only shows once its object is complete. (None, None) while nothing can be said yet."""
    head = _CALL_HEAD.match(text, start)
    if head is not None:
        name = json.loads(f'"{head.group(1)}"')
        end, done = scan_json_value(text, head.end())
        arguments = text[head.end():end].lstrip()
        if not done:
            return ParsedCall(name, arguments), None
        close = re.compile(r"\s*\}").match(text, end)
        return ParsedCall(name, arguments), (close.end() if close else None)
    end, done = scan_json_value(text, start)
    if not done:
        return None, None
    try:
        value = json.loads(text[start:end])
    except json.JSONDecodeError:
        return None, end
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None, end
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False)), end
