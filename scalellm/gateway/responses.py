"""The Responses API (/v1/responses), stateless: a request maps onto a chat request, its reply onto
a response object, streamed as OpenAI's typed events.

    input (string or items) + instructions ─▶ chat messages; tools (flat) ─▶ chat tools;
    text.format ─▶ response_format; max_output_tokens ─▶ max_tokens
    reply (ChoiceStream: reasoning, content, tool calls) ─▶ output items:
        reasoning · message (output_text) · function_call …

Nothing is stored: `previous_response_id` is refused (send the whole conversation as `input`), and
`store` is accepted but nothing is kept.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson

from scalellm.protocol.agent_fields import IGNORED_FIELDS, expect
from scalellm.protocol.choice_stream import ChoiceDelta, ChoiceStream
from scalellm.protocol.openai import (MAX_TOKENS_WITHOUT_CONTEXT, OpenAIError, ParsedRequest,
                                      chat_request_from_body, check_not_aborted, load_json_object)
from scalellm.protocol.types import FINISH_LENGTH, RequestOutput

RESPONSES_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
                              "tools", "tool_choice", "parallel_tool_calls", "text", "stream", "store",
                              "previous_response_id", "truncation", "include", "top_k", "seed", "stop"})
_SAMPLING = ("temperature", "top_p", "top_k", "seed", "stop")

_INCOMPLETE = {FINISH_LENGTH: "max_output_tokens", "content_filter": "content_filter"}
"""Finish reasons that leave a response incomplete, with the reason OpenAI gives."""


def _invalid(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param)


@dataclass
class ResponsesFields:
    """What a response echoes from its request."""

    instructions: str | None
    max_output_tokens: int | None
    tools: list[dict]
    tool_choice: object
    parallel_tool_calls: bool
    text: dict
    temperature: float | None
    top_p: float | None


def parse_responses_request(raw: bytes, max_model_len: int | None, affinity_chars: int = 256,
                            tool_parser: str = "hermes") -> ParsedRequest:
    """Validate a /v1/responses body and map it onto a chat request; 400 for bad input."""
    body = load_json_object(raw)
    for name in body:
        if name not in RESPONSES_FIELDS and name not in IGNORED_FIELDS:
            raise _invalid(f"'{name}' is not supported by /v1/responses; remove it", name)
    if body.get("previous_response_id") is not None:
        raise _invalid("'previous_response_id' is not supported: this server stores no responses; send the "
                       "whole conversation as 'input' items", "previous_response_id")
    for name, kind in (("store", "boolean"), ("text", "object"), ("tools", "array"), ("include", "array"),
                       ("stream", "boolean")):
        expect(body.get(name), kind, name, name)
    if body.get("truncation") not in (None, "disabled"):
        raise _invalid("'truncation' must be 'disabled': prompts are never cut", "truncation")
    if body.get("include"):
        raise _invalid("'include' is not supported", "include")
    chat = {"model": body.get("model"), "messages": _messages(body), "stream": body.get("stream")}
    chat.update({name: body[name] for name in _SAMPLING if name in body})
    chat["max_tokens"] = _max_output_tokens(body, max_model_len)
    tools = [_chat_tool(tool, i) for i, tool in enumerate(body.get("tools") or [])]
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    if body.get("parallel_tool_calls") is not None:
        chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    text = body.get("text") or {}
    response_format = _response_format(text)
    if response_format is not None:
        chat["response_format"] = response_format
    parsed = chat_request_from_body(chat, max_model_len, affinity_chars, tool_parser)
    parsed.responses = ResponsesFields(body.get("instructions"), body.get("max_output_tokens"),
                                       list(body.get("tools") or []), body.get("tool_choice", "auto"),
                                       body.get("parallel_tool_calls", True) is not False,
                                       {"format": text.get("format") or {"type": "text"}},
                                       body.get("temperature"), body.get("top_p"))
    return parsed


def _max_output_tokens(body: dict, max_model_len: int | None) -> int | None:
    value = expect(body.get("max_output_tokens"), "integer", "max_output_tokens", "max_output_tokens")
    limit = max_model_len or MAX_TOKENS_WITHOUT_CONTEXT
    if value is not None and not 1 <= value <= limit:
        raise _invalid(f"'max_output_tokens' must be between 1 and {limit} (the model's context length), "
                       f"got {value}", "max_output_tokens")
    return value


def _messages(body: dict) -> list[dict]:
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _invalid("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _invalid("'input' must be a string or a non-empty list of items", "input")
    for i, item in enumerate(items):
        _add_item(messages, item, i)
    if all(isinstance(item, dict) and item.get("type") == "reasoning" for item in items):
        raise _invalid("'input' needs an item other than reasoning (a message or a function call)", "input")
    return messages


_ITEM_ROLES = ("user", "system", "developer", "assistant")


def _item_string(item: dict, field: str, index: int) -> str:
    return expect(item.get(field), "string", f"input[{index}].{field}", "input", nullable=False)


def _add_item(messages: list[dict], item, index: int) -> None:
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message":
        if item.get("role") not in _ITEM_ROLES:
            raise _invalid(f"input[{index}].role must be one of {', '.join(_ITEM_ROLES)}", "input")
        messages.append({"role": item["role"], "content": _item_text(item.get("content"), index)})
    elif kind == "function_call":
        call = {"id": _item_string(item, "call_id", index), "type": "function",
                "function": {"name": _item_string(item, "name", index),
                             "arguments": _item_string(item, "arguments", index)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and "tool_calls" in last:
            last["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        messages.append({"role": "tool", "tool_call_id": _item_string(item, "call_id", index),
                         "content": _item_string(item, "output", index)})
    elif kind == "reasoning":
        return  # earlier reasoning is not replayed to the model
    else:
        raise _invalid(f"input[{index}] must be a message, function_call or function_call_output item", "input")


def _item_text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if (not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text")
                    or not isinstance(part.get("text"), str)):
                raise _invalid(f"input[{index}].content supports only text parts "
                               '({"type": "input_text" or "output_text", "text": "..."})', "input")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(f"input[{index}].content must be a string or a list of text parts", "input")


def _chat_tool(tool, index: int) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise _invalid(f"tools[{index}] must be a function tool (other built-in tools are not served)", "tools")
    function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if tool.get(key) is not None}
    return {"type": "function", "function": function}


def _chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _response_format(text: dict) -> dict | None:
    """text.format as chat's response_format (None for plain text), checked against the document."""
    format_ = expect(text.get("format"), "object", "text.format", "text")
    kind = format_.get("type") if format_ is not None else "text"
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _invalid("'text.format.type' must be 'text', 'json_object' or 'json_schema'", "text")
    expect(format_.get("name"), "string", "text.format.name", "text", nullable=False)
    for field, field_kind in (("schema", "object"), ("strict", "boolean"), ("description", "string")):
        expect(format_.get(field), field_kind, f"text.format.{field}", "text")
    spec = {key: format_[key] for key in ("name", "schema", "strict", "description") if format_.get(key) is not None}
    return {"type": "json_schema", "json_schema": spec}


class ResponsesRenderer:
    """One response: SSE events as the reply streams (`render`, `finish`), or the whole object
    (`add`, then `render()` with no output)."""

    def __init__(self, parsed: ParsedRequest, request_id: str, created: int, model: str) -> None:
        self._fields: ResponsesFields = parsed.responses
        self._id = request_id
        self._created = created
        self._model = model
        self._stream = ChoiceStream(parsed.tool_parser)
        self._items: list[dict] = []
        self._open: dict | None = None
        self._sequence = 0
        self._finish_reason: str | None = None
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0

    # -- the serving loop's two interfaces ---------------------------------------------------------
    def add(self, output: RequestOutput) -> None:
        self._consume(output)

    @property
    def last_finish_reason(self) -> str | None:
        """The engine's finish reason, once the response finished (metrics and traces)."""
        return self._finish_reason

    def render(self, output: RequestOutput | dict | None = None) -> bytes:
        """Streaming: the events for one delta output. Non-streamed: the response body (timings ignored)."""
        if isinstance(output, RequestOutput):
            events = self._start_events() if self._sequence == 0 else []
            return b"".join(events + self._consume(output))
        return orjson.dumps(self._response(self._status()))

    def _status(self) -> str:
        return "incomplete" if self._finish_reason in _INCOMPLETE else "completed"

    def finish(self, timings: dict | None = None) -> bytes:
        status = self._status()
        return self._event("response." + status, response=self._response(status))

    # -- folding the reply in --------------------------------------------------------------------
    def _consume(self, output: RequestOutput) -> list[bytes]:
        check_not_aborted(output)
        self.num_prompt_tokens = output.num_prompt_tokens or self.num_prompt_tokens
        events = []
        for sample in output.outputs:
            self.num_output_tokens += len(sample.token_ids)
            events += self._apply(self._stream.feed(sample.text))
            if sample.finish_reason is not None:
                self._finish_reason = sample.finish_reason
                events += self._apply(self._stream.finish())
                events += self._close()
        return events

    def _apply(self, delta: ChoiceDelta) -> list[bytes]:
        events = []
        if delta.reasoning:
            events += self._open_item("reasoning")
            self._open["content"][0]["text"] += delta.reasoning
        if delta.content:
            events += self._open_item("message")
            self._open["content"][0]["text"] += delta.content
            events.append(self._event("response.output_text.delta", item_id=self._open["id"],
                                      output_index=len(self._items) - 1, content_index=0, delta=delta.content))
        for call in delta.tool_calls:
            if "id" in call:
                events += self._close()
                events += self._add_item({"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:24],
                                          "call_id": call["id"], "name": call["function"]["name"],
                                          "arguments": "", "status": "in_progress"})
            fragment = call["function"]["arguments"]
            if fragment:
                self._open["arguments"] += fragment
                events.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                          output_index=len(self._items) - 1, delta=fragment))
        return events

    def _open_item(self, kind: str) -> list[bytes]:
        if self._open is not None and self._open["type"] == kind:
            return []
        events = self._close()
        if kind == "reasoning":
            item = {"type": "reasoning", "id": "rs_" + uuid.uuid4().hex[:24], "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"}
            return events + self._add_item(item)
        item = {"type": "message", "id": "msg_" + uuid.uuid4().hex[:24], "status": "in_progress",
                "role": "assistant", "content": []}
        events += self._add_item(item)
        part = {"type": "output_text", "text": "", "annotations": []}
        item["content"].append(part)
        return events + [self._event("response.content_part.added", item_id=item["id"],
                                     output_index=len(self._items) - 1, content_index=0,
                                     part={**part})]

    def _add_item(self, item: dict) -> list[bytes]:
        self._items.append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=len(self._items) - 1, item=_copy(item))]

    def _close(self) -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        item["status"] = "completed"
        index = len(self._items) - 1
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=_copy(part))]
        elif item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, arguments=item["arguments"]))
        return events + [self._event("response.output_item.done", output_index=index, item=_copy(item))]

    # -- events and the response object ---------------------------------------------------------
    def _start_events(self) -> list[bytes]:
        response = self._response("in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def _event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def _response(self, status: str) -> dict:
        f = self._fields
        return {
            "id": self._id, "object": "response", "created_at": self._created, "model": self._model,
            "status": status, "error": None,
            "incomplete_details": ({"reason": _INCOMPLETE[self._finish_reason]} if status == "incomplete"
                                   else None),
            "instructions": f.instructions, "max_output_tokens": f.max_output_tokens,
            "output": [_copy(item) for item in self._items] if status != "in_progress" else [],
            "parallel_tool_calls": f.parallel_tool_calls, "tool_choice": f.tool_choice, "tools": f.tools,
            "text": f.text, "temperature": f.temperature, "top_p": f.top_p, "truncation": "disabled",
            "previous_response_id": None, "store": False, "metadata": {},
            "usage": None if status == "in_progress" else {
                "input_tokens": self.num_prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.num_output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens},
        }


def _copy(item: dict) -> dict:
    return orjson.loads(orjson.dumps(item))
