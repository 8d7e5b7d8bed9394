"""The guard policy: which guards apply to which key, checking requests and wrapping replies.

Every key gets the guards of `--guard` first, then its own from the key file. Guards are built once
per spec and shared. Counters go through `count(guard, key_id, action)` with actions:

    blocked_input   a prompt refused             redacted_input   a prompt rewritten
    masked_output   a reply span masked          blocked_output   a reply ended (content_filter)
    error_open      the guard failed, request let through (fail=open)
    error_closed    the guard failed, request refused (fail=closed)
"""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable, Iterable

from scalellm.gateway.guards.base import Guard, GuardContext, GuardError
from scalellm.gateway.guards.registry import create_guard
from scalellm.gateway.guards.stream import GuardedStream, ReplyFilter
from scalellm.protocol.openai import OpenAIError, ParsedRequest
from scalellm.protocol.types import ChatPrompt, InfillPrompt, PromptInput

Counter = Callable[[str, str, str], None]


def _no_count(guard: str, key_id: str, action: str) -> None:
    pass


class GuardPolicy:
    """The guards of every key. Construction builds every guard (ValueError naming a bad spec)."""

    def __init__(self, global_specs: Iterable[str] = (), key_specs: dict[str, tuple[str, ...]] | None = None,
                 count: Counter = _no_count) -> None:
        self._built: dict[str, Guard] = {}
        self._global = [self._guard(spec, "--guard") for spec in global_specs]
        self._per_key = {key_id: self._global + [self._guard(spec, where) for spec, where in specs]
                         for key_id, specs in (key_specs or {}).items()}
        self.count = count

    def _guard(self, spec: str, where: str) -> Guard:
        if spec not in self._built:
            try:
                self._built[spec] = create_guard(spec)
            except ValueError as error:
                raise ValueError(f"{where}: guard {spec!r}: {error}") from None
        return self._built[spec]

    def guards_for(self, key_id: str) -> list[Guard]:
        return self._per_key.get(key_id, self._global)

    async def check_request(self, parsed: ParsedRequest, key_id: str,
                            complete: Callable[[str, int], Awaitable[str]] | None = None) -> ParsedRequest:
        """`parsed`, possibly with redacted prompts; OpenAIError 400 (code content_filter) when refused."""
        guards = self.guards_for(key_id)
        if not guards:
            return parsed
        if parsed.top_logprobs is not None and any(guard.scans_output for guard in guards):
            raise OpenAIError(400, "logprobs are not available with this key's output guards (the tokens "
                              "would show text the guards mask)", param="logprobs", code="content_filter")
        texts = prompt_texts(parsed)
        context = GuardContext(key_id, complete)
        for guard in guards:
            texts = await self._check_one(guard, texts, context)
        return with_texts(parsed, texts)

    async def _check_one(self, guard: Guard, texts: tuple[str, ...], context: GuardContext) -> tuple[str, ...]:
        try:
            verdict = await guard.check_input(texts, context)
        except GuardError as error:
            self.count(guard.name, context.key_id, "error_closed" if guard.fail_closed else "error_open")
            if guard.fail_closed:
                raise OpenAIError(400, f"the request could not be checked by the {guard.name} guard ({error}); "
                                  "it is refused", code="content_filter") from None
            return texts
        if verdict.blocked:
            self.count(guard.name, context.key_id, "blocked_input")
            raise OpenAIError(400, f"the request was refused by the {guard.name} guard: {verdict.reason}",
                              code="content_filter")
        if verdict.texts is not None:
            self.count(guard.name, context.key_id, "redacted_input")
            return verdict.texts
        return texts

    def guard_stream(self, key_id: str, stream, num_samples: int):
        """`stream` itself when no guard of the key scans replies, else a GuardedStream over it."""
        guards = [guard for guard in self.guards_for(key_id) if guard.scans_output]
        if not guards:
            return stream
        return GuardedStream(stream, ReplyFilter(guards, num_samples,
                                                 lambda guard, action: self.count(guard, key_id, action)))

    async def close(self) -> None:
        for guard in self._built.values():
            close = getattr(guard, "close", None)
            if close is not None:
                await close()


def _texts_of(prompt: PromptInput) -> list[str] | None:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, InfillPrompt):
        return [prompt.prefix, prompt.suffix]
    if isinstance(prompt, ChatPrompt):
        return [message.get("content") or "" for message in prompt.messages]
    return None


def prompt_texts(parsed: ParsedRequest) -> tuple[str, ...]:
    """Every text the guards must see, in order; OpenAIError 400 for token-id prompts (they cannot be read)."""
    texts = []
    for prompt in [parsed.prompt, *(parsed.extra_prompts or ())]:
        part = _texts_of(prompt)
        if part is None:
            raise OpenAIError(400, "prompts given as token ids cannot be checked by this key's guards; send text",
                              param="prompt", code="content_filter")
        texts += part
    return tuple(texts)


def _rebuild(prompt: PromptInput, texts: list[str]) -> PromptInput:
    if isinstance(prompt, str):
        return texts[0]
    if isinstance(prompt, InfillPrompt):
        return InfillPrompt(texts[0], texts[1])
    messages = [{**message, "content": text} for message, text in zip(prompt.messages, texts)]
    return dataclasses.replace(prompt, messages=messages)


def with_texts(parsed: ParsedRequest, texts: tuple[str, ...]) -> ParsedRequest:
    """`parsed` with its prompts' texts replaced by `texts` (as prompt_texts listed them)."""
    if texts == prompt_texts(parsed):
        return parsed
    prompts, rest = [], list(texts)
    for prompt in [parsed.prompt, *(parsed.extra_prompts or ())]:
        count = len(_texts_of(prompt))
        prompts.append(_rebuild(prompt, rest[:count]))
        rest = rest[count:]
    return dataclasses.replace(parsed, prompt=prompts[0], extra_prompts=prompts[1:] or None)
