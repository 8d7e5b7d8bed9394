"""A synthetic engine with no model, to measure and test everything around the model.

`scalellm replica --engine mock --tpot-ms 5` serves it: prompts are "tokenized" by splitting on
whitespace (one token per word; chat messages' contents are concatenated), and every sample streams
`max_tokens` tokens "tok0", " tok1", ... (token id k for "tokk"). One step loop serves all requests,
as the real engine does: it steps every `tpot_ms`, and each step gives one token to every running
request whose first token is due (`ttft_ms` after admission, so at the first step after that), so
the outputs of concurrent requests come out together. Load (running, waiting, tokens in flight),
health and aborts are real.

Honored: n, max_tokens (None: up to max_model_len), stop strings (matched in the text, cut unless
include_stop_str_in_output; a stop string is detected once complete, without holding back text
already streamed), stop_token_ids (after min_tokens), logprobs (fake values: the chosen
token at rank 1 with logprob -0.5, alternatives with ids >= VOCAB_SIZE). Ignored: EOS (there is none),
temperature and the other sampling knobs, seed, skip_special_tokens.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import AsyncIterator

from scalellm.engine.client import EngineClient
from scalellm.protocol.types import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    ChatPrompt,
    CompletionOutput,
    EngineHealth,
    EngineLoad,
    Logprob,
    PromptInput,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)

VOCAB_SIZE = 32000
STALL_TIMEOUT_S = 10.0


@dataclass
class _Sample:
    """One sample's progress; `text` is everything generated so far (after a stop-string cut)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _MockRequest:
    """A request inside the mock engine; outputs go to `queue` for its `generate` iterator."""

    request_id: str
    params: SamplingParams
    num_prompt_tokens: int
    max_tokens: int
    metrics: RequestMetrics
    samples: list[_Sample]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    next_token_time: float = math.inf
    done: bool = False

    @property
    def num_tokens_in_flight(self) -> int:
        prefill = self.num_prompt_tokens if self.metrics.first_token_time == 0.0 else 0
        return prefill + sum(self.max_tokens - s.num_tokens for s in self.samples if s.finish_reason is None)


class MockEngine(EngineClient):
    """An `EngineClient` that streams synthetic tokens at a fixed pace (see the module docstring)."""

    def __init__(self, model_name: str = "mock", *, tpot_ms: float = 5.0, ttft_ms: float = 0.0,
                 max_model_len: int = 4096, max_num_seqs: int = 256, block_size: int = 16) -> None:
        if tpot_ms < 0 or ttft_ms < 0:
            raise ValueError("tpot_ms and ttft_ms must be >= 0")
        if max_model_len < 1 or max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_model_len, max_num_seqs and block_size must be >= 1")
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._tpot_s = tpot_ms / 1000.0
        self._ttft_s = ttft_ms / 1000.0
        self._max_num_seqs = max_num_seqs
        self._block_size = block_size
        self._num_total_blocks = max_num_seqs * -(-max_model_len // block_size)
        self._requests: dict[str, _MockRequest] = {}
        self._waiting: collections.deque[_MockRequest] = collections.deque()
        self._running: list[_MockRequest] = []
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._last_step_time = time.time()
        self._epoch = self._last_step_time  # steps fall on epoch + k * tpot

    async def start(self) -> None:
        """Start the step loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def shutdown(self) -> None:
        """Abort every request and stop the step loop."""
        for request_id in list(self._requests):
            await self.abort(request_id)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       metrics: RequestMetrics | None = None) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs; closing the iterator early aborts the request."""
        request = self._submit(request_id, prompt, params, metrics or RequestMetrics())
        try:
            while True:
                output = await request.queue.get()
                yield output
                if output.finished:
                    return
        finally:
            if not request.done:
                self._remove(request)

    async def abort(self, request_id: str) -> None:
        """Abort a request in flight; its stream ends with finish_reason "abort"."""
        request = self._requests.get(request_id)
        if request is None:
            return
        deltas = []
        for sample in request.samples:
            if sample.finish_reason is None:
                sample.finish_reason = FINISH_ABORT
                deltas.append(CompletionOutput(sample.index, finish_reason=FINISH_ABORT))
        self._remove(request)
        request.queue.put_nowait(self._output(request, deltas))

    def health(self) -> EngineHealth:
        """Unhealthy when the step loop is not running or has work but made no progress lately."""
        if self._loop_task is None:
            return EngineHealth(False, "engine not started")
        if self._loop_task.done():
            error = None if self._loop_task.cancelled() else self._loop_task.exception()
            return EngineHealth(False, f"step loop ended: {error!r}")
        stalled_s = time.time() - self._last_step_time
        if self._requests and stalled_s > STALL_TIMEOUT_S + self._tpot_s + self._ttft_s:
            return EngineHealth(False, f"no step for {stalled_s:.1f} s with work pending")
        return EngineHealth(True)

    def load(self) -> EngineLoad:
        """Running and waiting requests, fake KV blocks (one per block_size tokens) and tokens in flight."""
        used_tokens = sum(r.num_prompt_tokens + max(s.num_tokens for s in r.samples) for r in self._running)
        used_blocks = -(-used_tokens // self._block_size)
        return EngineLoad(
            num_running=len(self._running), num_waiting=len(self._waiting),
            num_free_blocks=max(0, self._num_total_blocks - used_blocks),
            num_total_blocks=self._num_total_blocks,
            num_tokens_in_flight=sum(r.num_tokens_in_flight for r in self._requests.values()))

    # --- admission ---------------------------------------------------------------------------

    def _submit(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                metrics: RequestMetrics) -> _MockRequest:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        num_prompt_tokens = len(tokenize(prompt))
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens; this model's context is "
                             f"{self.max_model_len} tokens")
        max_tokens = params.max_tokens or self.max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) "
                             f"exceeds the context of {self.max_model_len} tokens")
        request = _MockRequest(request_id, params, num_prompt_tokens, max_tokens, metrics,
                               [_Sample(i) for i in range(params.n)])
        self._requests[request_id] = request
        self._waiting.append(request)
        self._wakeup.set()
        return request

    def _remove(self, request: _MockRequest) -> None:
        request.done = True
        self._requests.pop(request.request_id, None)
        if request in self._running:
            self._running.remove(request)
        elif request in self._waiting:
            self._waiting.remove(request)

    # --- the step loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._requests:
                self._wakeup.clear()
                await self._wakeup.wait()
            now = time.time()
            self._admit(now)
            self._step(now)
            self._last_step_time = now
            next_time = min((r.next_token_time for r in self._running), default=now)
            await asyncio.sleep(max(0.0, next_time - time.time()))

    def _step_at_or_after(self, moment: float) -> float:
        """The time of the first step of the engine's cadence (every tpot) at or after `moment`."""
        if self._tpot_s <= 0:
            return moment
        steps = math.ceil((moment - self._epoch) / self._tpot_s - 0.01)  # tolerates clock rounding
        return self._epoch + max(0, steps) * self._tpot_s

    def _admit(self, now: float) -> None:
        while self._waiting and len(self._running) < self._max_num_seqs:
            request = self._waiting.popleft()
            request.metrics.scheduled_time = now
            request.next_token_time = self._step_at_or_after(now + self._ttft_s)
            self._running.append(request)

    def _step(self, now: float) -> None:
        for request in [r for r in self._running if r.next_token_time <= now]:
            if request.metrics.first_token_time == 0.0:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
            request.next_token_time = self._step_at_or_after(request.next_token_time + self._tpot_s)
            deltas = [self._advance(request, s) for s in request.samples if s.finish_reason is None]
            if all(s.finish_reason is not None for s in request.samples):
                self._remove(request)
            request.queue.put_nowait(self._output(request, deltas))

    def _advance(self, request: _MockRequest, sample: _Sample) -> CompletionOutput:
        """Generate one token of `sample`; returns its delta."""
        params = request.params
        token_id = sample.num_tokens
        token_text = f"tok{token_id}" if token_id == 0 else f" tok{token_id}"
        sample.num_tokens += 1
        sample.cumulative_logprob += -0.5
        start = len(sample.text)
        sample.text += token_text
        if token_id in params.stop_token_ids and sample.num_tokens > params.min_tokens:
            sample.finish_reason, sample.stop_reason = FINISH_STOP, token_id
            sample.text = sample.text[:start]
        else:
            self._match_stop_string(sample, params, start)
        if sample.finish_reason is None and sample.num_tokens >= request.max_tokens:
            sample.finish_reason = FINISH_LENGTH
        logprobs = None
        if params.logprobs is not None:
            logprobs = [_fake_logprobs(token_id, token_text, params.logprobs)]
        return CompletionOutput(sample.index, sample.text[start:], [token_id],
                                sample.cumulative_logprob if logprobs else None, logprobs,
                                sample.finish_reason, sample.stop_reason)

    @staticmethod
    def _match_stop_string(sample: _Sample, params: SamplingParams, start: int) -> None:
        for stop in params.stop:
            position = sample.text.find(stop, max(0, start - len(stop) + 1))
            if position >= 0:
                end = position + len(stop) if params.include_stop_str_in_output else position
                sample.text = sample.text[:end]
                sample.finish_reason, sample.stop_reason = FINISH_STOP, stop
                return

    def _output(self, request: _MockRequest, deltas: list[CompletionOutput]) -> RequestOutput:
        finished = request.done
        return RequestOutput(request.request_id, deltas, finished=finished,
                             num_prompt_tokens=request.num_prompt_tokens,
                             metrics=request.metrics if finished else None)


def tokenize(prompt: PromptInput) -> list[int]:
    """The mock's tokenizer: one token per whitespace-separated word, a blank text being one token. A
    chat renders like a template would: a role marker before each message, and one for the reply."""
    if isinstance(prompt, list):
        return list(prompt)
    if isinstance(prompt, ChatPrompt):
        prompt = " ".join(f"<{m.get('role')}> " + (m.get("content") if isinstance(m.get("content"), str) else "")
                          for m in prompt.messages) + (" <assistant>" if prompt.add_generation_prompt else "")
    words = prompt.split() or ([prompt] if prompt else [])
    return [zlib.crc32(word.encode()) % VOCAB_SIZE for word in words]


def _fake_logprobs(token_id: int, token_text: str, num_alternatives: int) -> dict[int, Logprob]:
    entries = {token_id: Logprob(-0.5, 1, token_text)}
    for rank in range(2, num_alternatives + 2):
        entries[VOCAB_SIZE + rank] = Logprob(-0.5 - rank, rank, f" alt{rank}")
    return entries
