"""One chat choice's text turned into OpenAI's message parts, identically streamed or whole.

    generated text ──▶ reasoning split (<think>…</think> → reasoning_content)
                   ──▶ tool parser (when the request has tools) → content + tool calls
                   ──▶ the difference from the previous snapshot → one delta

Every step re-reads the whole text so far (replies are short; this keeps the parsers pure
functions of the text). Snapshots only grow, so the deltas of any chunking add up to the snapshot
of the whole text: streamed and non-streamed replies agree, whatever the chunking.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from scalellm.protocol.tool_parsers import ParsedCall, Snapshot, ToolParser
from scalellm.protocol.tool_parsers.base import held_back

THINK_BEGIN, THINK_END = "<think>", "</think>"


@dataclass
class ChoiceDelta:
    """What one step added: text to content and reasoning, and tool-call deltas in OpenAI's format."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def split_reasoning(text: str, final: bool) -> tuple[str, str, bool]:
    """(reasoning, the rest, whether the rest is certain) for a reply that may open with <think>."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_BEGIN):
        if not final and THINK_BEGIN.startswith(stripped):
            return "", "", False  # could still become <think>
        return "", text, True
    body = stripped[len(THINK_BEGIN):]
    end = body.find(THINK_END)
    if end < 0:
        return body if final else body[:len(body) - held_back(body, THINK_END)], "", final
    return body[:end], body[end + len(THINK_END):].lstrip(), True


class ChoiceStream:
    """Feeds one choice's generated text and yields deltas; `finish` flushes what was held back."""

    def __init__(self, parser: ToolParser | None) -> None:
        self.parser = parser
        self.text = ""
        self._previous = Snapshot()
        self._reasoning = ""
        self._plain = False
        """No parser and no reasoning section left to split: new text is content as it comes."""
        self.call_ids: list[str] = []

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._previous.calls)

    def feed(self, new_text: str) -> ChoiceDelta:
        self.text += new_text
        if self._plain:
            self._previous.content += new_text
            return ChoiceDelta(content=new_text)
        return self._advance(final=False)

    def finish(self) -> ChoiceDelta:
        return self._advance(final=True)

    def _advance(self, final: bool) -> ChoiceDelta:
        reasoning, rest, certain = split_reasoning(self.text, final)
        if self.parser is None:
            current = Snapshot(rest)
            thinking = self.text.lstrip().startswith(THINK_BEGIN)
            self._plain = certain and (bool(rest) or not thinking)
        else:
            current = self.parser.snapshot(rest, final)
        delta = ChoiceDelta(reasoning=_grown(self._reasoning, reasoning, "reasoning"),
                            content=_grown(self._previous.content, current.content, "content"))
        self._reasoning = reasoning
        delta.tool_calls = self._call_deltas(current.calls)
        self._previous = current
        return delta

    def _call_deltas(self, calls: list[ParsedCall]) -> list[dict]:
        deltas = []
        for index, call in enumerate(calls):
            if index >= len(self._previous.calls):
                self.call_ids.append("call_" + uuid.uuid4().hex[:24])
                deltas.append({"index": index, "id": self.call_ids[index], "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
                continue
            grown = _grown(self._previous.calls[index].arguments, call.arguments, "arguments")
            if grown:
                deltas.append({"index": index, "function": {"arguments": grown}})
        return deltas


def _grown(before: str, after: str, what: str) -> str:
    """The text `after` adds to `before`; a snapshot that does not extend the last is a parser bug."""
    if not after.startswith(before):
        raise AssertionError(f"the {what} snapshot shrank: {before!r} -> {after!r}")
    return after[len(before):]


def assemble(deltas: list[ChoiceDelta]) -> tuple[str, str, list[dict]]:
    """(content, reasoning, tool calls) a client builds from `deltas` (for the non-streamed body and tests)."""
    content, reasoning, calls = [], [], []
    for delta in deltas:
        content.append(delta.content)
        reasoning.append(delta.reasoning)
        for call in delta.tool_calls:
            if call["index"] == len(calls):
                calls.append({"id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"], "arguments": ""}})
            calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    return "".join(content), "".join(reasoning), calls
