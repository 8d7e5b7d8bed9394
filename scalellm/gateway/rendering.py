"""Turning a replica's delta outputs into OpenAI responses: SSE events for streams, one body otherwise.

The SSE hot path builds each event from bytes prepared once per request:

    data: {"id":"chatcmpl-…","object":"chat.completion.chunk","created":…,"model":"…","choices":[   ← head
      {"index":0,"delta":{"content":"<new text>"},"logprobs":null,"finish_reason":null}           ← per event
    ]}\\n\\n                                                                                       ← tail

Non-standard extension: the gateway may add a top-level ``"scalellm_timings"`` object (the request's
stage timestamps, contract in scalellm/bench/breakdown.py) to the non-streamed body and, in streams,
to the final chunk that carries ``usage`` (only sent when ``stream_options.include_usage`` is set; no
chunk is added for it). OpenAI clients ignore unknown fields. It costs one orjson dump per request.
"""

from __future__ import annotations

import orjson

from scalellm.protocol.choice_stream import ChoiceDelta, ChoiceStream, assemble
from scalellm.protocol.openai import (CompletionLogprobs, ParsedRequest, chat_logprobs, check_not_aborted,
                                      usage)
from scalellm.protocol.types import FINISH_STOP, CompletionOutput, RequestOutput

DONE_EVENT = b"data: [DONE]\n\n"
TIMINGS_FIELD = "scalellm_timings"
_NULL = b"null"
_FINISH = {None: _NULL, "stop": b'"stop"', "length": b'"length"', "tool_calls": b'"tool_calls"'}


def _finish_bytes(reason: str | None) -> bytes:
    return _FINISH.get(reason) or orjson.dumps(reason)


def num_choices(parsed: ParsedRequest) -> int:
    """n per prompt; a completions request with several prompts has n choices for each."""
    return parsed.params.n * (1 + len(parsed.extra_prompts or ()))


def echo_text(parsed: ParsedRequest, index: int) -> str:
    """The prompt text echoed before choice `index` (completions with echo)."""
    prompts = [parsed.prompt, *(parsed.extra_prompts or ())]
    prompt = prompts[index // parsed.params.n]
    return prompt if isinstance(prompt, str) else ""


class _Accounting:
    """Token counts, per-sample logprob state and chat choice parsing shared by both renderers."""

    def __init__(self, parsed: ParsedRequest) -> None:
        self.chat = parsed.chat
        self.top_logprobs = parsed.top_logprobs
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.last_finish_reason: str | None = None
        """The finish reason of the sample that finished last (metrics and traces)."""
        self._completion_logprobs: dict[int, CompletionLogprobs] = {}
        self.choices = [ChoiceStream(parsed.tool_parser) for _ in range(num_choices(parsed))] if parsed.chat else []

    def choice_delta(self, sample: CompletionOutput) -> ChoiceDelta:
        """The chat message parts `sample` adds (everything held back, once it finished)."""
        stream = self.choices[sample.index]
        delta = stream.feed(sample.text)
        if sample.finish_reason is not None:
            rest = stream.finish()
            delta = ChoiceDelta(delta.content + rest.content, delta.reasoning + rest.reasoning,
                                delta.tool_calls + rest.tool_calls)
        return delta

    def finish_reason(self, sample: CompletionOutput) -> str | None:
        """OpenAI's finish reason: "tool_calls" when a chat reply that stopped made calls."""
        if sample.finish_reason == FINISH_STOP and self.chat and self.choices[sample.index].has_tool_calls:
            return "tool_calls"
        return sample.finish_reason

    def logprobs_delta(self, sample: CompletionOutput):
        """The logprobs object for the new positions of `sample` (None when not requested)."""
        if self.top_logprobs is None or sample.logprobs is None:
            return None
        if self.chat:
            return {"content": chat_logprobs(sample.token_ids, sample.logprobs, self.top_logprobs)}
        state = self._completion_logprobs.get(sample.index)
        if state is None:
            state = self._completion_logprobs[sample.index] = CompletionLogprobs(self.top_logprobs)
        return state.add(sample.token_ids, sample.logprobs)

    def whole_completion_logprobs(self, index: int):
        state = self._completion_logprobs.get(index)
        return None if state is None else state.whole()

    def count(self, output: RequestOutput) -> None:
        check_not_aborted(output)
        self.num_prompt_tokens = output.num_prompt_tokens or self.num_prompt_tokens
        for sample in output.outputs:
            self.num_output_tokens += len(sample.token_ids)
            if sample.finish_reason is not None:
                self.last_finish_reason = sample.finish_reason


class StreamRenderer(_Accounting):
    """Renders SSE events for one streamed request."""

    def __init__(self, parsed: ParsedRequest, request_id: str, created: int, model: str) -> None:
        super().__init__(parsed)
        kind = b"chat.completion.chunk" if parsed.chat else b"text_completion"
        self._head = (b'data: {"id":"' + request_id.encode() + b'","object":"' + kind + b'","created":'
                      + str(created).encode() + b',"model":' + orjson.dumps(model) + b',"choices":[')
        self._include_usage = parsed.include_usage
        self._tail = b'],"usage":null}\n\n' if parsed.include_usage else b"]}\n\n"
        self._num_samples = num_choices(parsed)
        self._parsed = parsed
        self._started = False

    def render(self, output: RequestOutput) -> bytes:
        """The events for one delta output (may be empty bytes)."""
        self.count(output)
        head, tail = self._head, self._tail
        events = []
        if not self._started:
            self._started = True
            if self.chat:
                events = [head + b'{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
                          b'"finish_reason":null}' % i + tail for i in range(self._num_samples)]
            elif self._parsed.echo:
                events = [head + b'{"index":%d,"text":' % i + orjson.dumps(echo_text(self._parsed, i))
                          + b',"logprobs":null,"finish_reason":null}' + tail for i in range(self._num_samples)]
        for sample in output.outputs:
            if sample.text or sample.finish_reason is not None or sample.token_ids:
                choice = self._choice(sample)
                if choice:
                    events.append(head + choice + tail)
        return b"".join(events)

    def _choice(self, sample: CompletionOutput) -> bytes:
        logprobs = self.logprobs_delta(sample)
        logprobs_bytes = _NULL if logprobs is None else orjson.dumps(logprobs)
        if self.chat:
            parts = self.choice_delta(sample)
            if not parts and sample.finish_reason is None and logprobs is None and self.choices[sample.index].parser:
                return b""  # text held back by the tool parser (a forced call's fixed opening, say)
            if parts.reasoning or parts.tool_calls:
                delta = orjson.dumps(_delta_dict(parts))
            else:
                delta = b'{"content":' + orjson.dumps(parts.content) + b"}" if parts.content else b"{}"
            return (b'{"index":%d,"delta":' % sample.index + delta + b',"logprobs":' + logprobs_bytes
                    + b',"finish_reason":' + _finish_bytes(self.finish_reason(sample)) + b"}")
        return (b'{"index":%d,"text":' % sample.index + orjson.dumps(sample.text) + b',"logprobs":'
                + logprobs_bytes + b',"finish_reason":' + _finish_bytes(sample.finish_reason) + b"}")

    def finish(self, timings: dict | None = None) -> bytes:
        """The usage event (when asked for, with `timings` as "scalellm_timings") and the [DONE] terminator."""
        if not self._include_usage:
            return DONE_EVENT
        extra = b"" if timings is None else b',"' + TIMINGS_FIELD.encode() + b'":' + orjson.dumps(timings)
        return (self._head + b'],"usage":' + orjson.dumps(usage(self.num_prompt_tokens, self.num_output_tokens))
                + extra + b"}\n\n" + DONE_EVENT)


def _delta_dict(parts: ChoiceDelta) -> dict:
    delta = {}
    if parts.reasoning:
        delta["reasoning_content"] = parts.reasoning
    if parts.content:
        delta["content"] = parts.content
    if parts.tool_calls:
        delta["tool_calls"] = parts.tool_calls
    return delta


def error_event(body: bytes) -> bytes:
    """An error reported inside a stream that already started."""
    return b"data: " + body + b"\n\n" + DONE_EVENT


class ResponseBuilder(_Accounting):
    """Accumulates delta outputs and renders the non-streamed response body."""

    def __init__(self, parsed: ParsedRequest, request_id: str, created: int, model: str) -> None:
        super().__init__(parsed)
        self._request_id = request_id
        self._created = created
        self._model = model
        count = num_choices(parsed)
        self._parsed = parsed
        self._texts: list[list[str]] = [[] for _ in range(count)]
        self._finish_reasons: list[str | None] = [None] * count
        self._chat_logprobs: list[list[dict]] = [[] for _ in range(count)]
        self._deltas: list[list[ChoiceDelta]] = [[] for _ in range(count)]

    def add(self, output: RequestOutput) -> None:
        """Fold one delta output in."""
        self.count(output)
        for sample in output.outputs:
            self._texts[sample.index].append(sample.text)
            if self.chat:
                self._deltas[sample.index].append(self.choice_delta(sample))
            if sample.finish_reason is not None:
                self._finish_reasons[sample.index] = self.finish_reason(sample)
            logprobs = self.logprobs_delta(sample)
            if logprobs is not None and self.chat:
                self._chat_logprobs[sample.index] += logprobs["content"]

    def _choice(self, index: int) -> dict:
        text = "".join(self._texts[index])
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = ({"content": self._chat_logprobs[index]} if self.chat
                        else self.whole_completion_logprobs(index))
        if self.chat:
            return {"index": index, "message": self.message(index), "logprobs": logprobs,
                    "finish_reason": self._finish_reasons[index]}
        if self._parsed.echo:
            text = echo_text(self._parsed, index) + text
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": self._finish_reasons[index]}

    def message(self, index: int) -> dict:
        """The assistant message of chat choice `index`: content (null beside tool calls), reasoning, calls."""
        content, reasoning, calls = assemble(self._deltas[index])
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        return message

    @property
    def finish_reasons(self) -> list[str | None]:
        return self._finish_reasons

    def render(self, timings: dict | None = None) -> bytes:
        """The whole response body (with `timings` as "scalellm_timings" when given)."""
        body = {
            "id": self._request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [self._choice(i) for i in range(len(self._texts))],
            "usage": usage(self.num_prompt_tokens, self.num_output_tokens),
        }
        if timings is not None:
            body[TIMINGS_FIELD] = timings
        return orjson.dumps(body)
