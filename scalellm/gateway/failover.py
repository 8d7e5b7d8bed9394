"""Failover that loses no token: a request whose replica fails after some output continues on another.

    replica A   chunk ─ chunk ─ chunk ─ ✗   (killed, connection lost, breaker opened, drained)
                                        │
                                        └─ resume: the same request + the output token ids delivered
    replica B                              prefill prompt + delivered ─ chunk ─ … ─ finished

The client sees one stream (or one body): no repeated and no missing text, usage counting each
token once. The replica does the seam's work (GenerateRequest.resume_token_ids): the delivered
tokens count toward max_tokens and the penalties, its detokenizer starts after their released text,
and seeded sampling draws as a function of (seed, position), so greedy and seeded requests continue
exactly as an uninterrupted run would. A resume that fails too moves on to the next replica; when
none is left the request ends with an error (an error event in a stream), never a hang.

Only single-sample requests (n = 1, one prompt) resume; the others fail as before (a stream ends
with an error event; a non-streamed request reruns from the start elsewhere).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from scalellm.protocol.types import FINISH_LENGTH, CompletionOutput, RequestOutput
from scalellm.rpc.client import ReplicaError

logger = logging.getLogger("scalellm.gateway.failover")

StartAttempt = Callable[[list[int], object], Awaitable[tuple]]
"""Given the delivered output token ids and the dispatch that failed, dispatch the request to a
replica it has not failed on and return (dispatch, stream, first output); raises OpenAIError when
no replica is left."""

NOT_RESUMED = frozenset({504})
"""Failures that end the request instead: the deadline (it is the whole request's)."""


class ResumingStream:
    """One single-sample request's outputs across replicas. The serving loop uses it both as the
    stream and as the dispatch (`finish`, `replica`), like MergedStreams."""

    def __init__(self, start: StartAttempt, attempt: tuple, max_tokens: int | None) -> None:
        """attempt: the first (dispatch, stream, first output); max_tokens: the request's cap on output
        tokens after context capping, None when unknown."""
        self._start = start
        self.dispatch, self._stream, first = attempt
        self._max_tokens = max_tokens
        self._delivered: list[int] = []
        self._finished = False
        self.num_resumes = 0
        self.first = self._note(first)

    @property
    def replica(self):
        """The replica serving the request now."""
        return self.dispatch.replica

    def _note(self, output: RequestOutput) -> RequestOutput:
        for sample in output.outputs:
            self._delivered.extend(sample.token_ids)
        self._finished = output.finished
        return output

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        while not self._finished:
            try:
                async for output in self._stream:
                    yield self._note(output)
                if self._finished:
                    return
                failure = ReplicaError(f"replica {self.replica.address} ended the request unfinished", 503)
            except ReplicaError as error:
                if error.status_code < 500 or error.status_code in NOT_RESUMED:
                    raise
                failure = error
            yield self._note(await self._resume(failure))

    async def _resume(self, failure: ReplicaError) -> RequestOutput:
        """Leave the failed replica and continue elsewhere; the new attempt's first output."""
        self.dispatch.finish(False)
        await self._stream.aclose()
        if self._max_tokens is not None and len(self._delivered) >= self._max_tokens:
            # Everything was delivered; only the finish was lost with the replica.
            sample = CompletionOutput(index=0, finish_reason=FINISH_LENGTH)
            return RequestOutput(request_id="", outputs=[sample], finished=True)
        logger.warning("%s; resuming after %d delivered tokens", failure.message, len(self._delivered))
        self.dispatch, self._stream, first = await self._start(list(self._delivered), self.dispatch)
        self.num_resumes += 1
        return first

    async def aclose(self) -> None:
        await self._stream.aclose()

    def finish(self, ok: bool | None) -> None:
        self.dispatch.finish(ok)
