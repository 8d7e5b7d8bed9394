"""The asynchronous engine interface a replica serves from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import AsyncIterator, Sequence

from scalellm.protocol.types import (EngineHealth, EngineLoad, PromptInput, RequestMetrics, RequestOutput,
                                     ResumedSample, SamplingParams)


class EngineClient(ABC):
    """An engine driven from asyncio: the real engine (`AsyncLLM`) and the synthetic one implement it.

    The replica's gRPC service only talks to this interface, so it can serve either without knowing which.
    Implementations own tokenization, the chat template and detokenization.
    """

    model_name: str
    """The name the model is served under (what `/v1/models` lists)."""
    max_model_len: int
    """Most tokens (prompt plus output) a request may hold."""
    weights: str
    """How the model runs, e.g. "quantization gguf, dtype bfloat16"."""

    @abstractmethod
    async def start(self) -> None:
        """Start the engine's step loop. Called once, inside the running event loop."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Abort everything in flight and stop the step loop."""

    @abstractmethod
    def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                 metrics: RequestMetrics | None = None,
                 resumed_samples: Sequence[ResumedSample] = (), final_only: bool = False
                 ) -> AsyncIterator[RequestOutput]:
        """Submit a request and stream its outputs in delta mode.

        Each yielded `RequestOutput` holds only what is new since the previous one (text, token ids,
        logprobs per sample index); the last has `finished=True` and carries `metrics`.
        `num_prompt_tokens` is set on every output. Raises `ValueError` (before the first output) for
        input that cannot be served: an empty prompt, a prompt longer than the context, a chat that the
        template rejects. Closing the iterator early (the caller cancelled) aborts the request and frees
        its KV blocks. `metrics`, when given, carries timestamps taken before the engine saw the request.

        `resumed_samples` (failover): when given, only these samples run, each as sample `index` of
        the request's n, after the output tokens another replica already generated and delivered.
        Each continues as if it had generated them itself: they count toward max_tokens and the
        penalties, a grammar is advanced past them, its cumulative logprob continues from the
        delivered one, and its outputs start with the first new token (no text of theirs is
        repeated); num_prompt_tokens stays the prompt's. With a seed or greedy sampling the
        continuation equals an uninterrupted run. Bad samples (an index not below n or listed twice,
        token ids outside the vocabulary, no output left to generate) raise `ValueError`.

        `final_only`: yield one output, when the request finishes, holding what the delta outputs
        would have held together (text, token ids, logprobs, finish and stop reasons per sample).
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request if it is still in flight; its stream ends with finish_reason "abort"."""

    @abstractmethod
    def health(self) -> EngineHealth:
        """The engine loop's real state: unhealthy when it died or has work but stopped making progress."""

    @abstractmethod
    def load(self) -> EngineLoad:
        """Current load, for the gateway's routing."""
