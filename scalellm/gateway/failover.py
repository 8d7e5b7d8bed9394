"""Failover that loses no token: a request whose replica fails after some output continues on another.

    replica A   chunk ─ chunk ─ chunk ─ ✗   (killed, connection lost, breaker opened, drained)
                                        │
                                        └─ resume: the same request + each unfinished sample's
                                           delivered output token ids and cumulative logprob
    replica B                              prefill prompt + delivered ─ chunk ─ … ─ finished

Every request shape resumes: one sample, n samples of one prompt (the samples that had not finished
continue, each under its own index; the finished ones are not run again), and completions with
several prompts (each prompt's replica request is a ResumingStream of its own, with its own set of
replicas tried, merged by serving.MergedStreams).

The client sees one stream (or one body): no repeated and no missing text, usage counting each
token once. The replica does the seam's work (GenerateRequest.resumed_samples): the delivered
tokens count toward max_tokens and the penalties, its detokenizer starts after their released text,
the cumulative logprob continues from the delivered one, and seeded sampling draws as a function of
(seed, sample index, position), so greedy and seeded requests continue exactly as an uninterrupted
run would. A sample whose every token was delivered, with only its finish lost, is finished here
("length") instead of resumed. A resume that fails too moves on to the next replica; when none is
left the request ends with an error (an error event in a stream), never a hang.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from scalellm.protocol.types import FINISH_LENGTH, CompletionOutput, RequestOutput, ResumedSample
from scalellm.rpc.client import ReplicaError

logger = logging.getLogger("scalellm.gateway.failover")

StartAttempt = Callable[[list[ResumedSample], object], Awaitable[tuple]]
"""Given the samples to resume (each after its delivered output) and the dispatch that failed,
dispatch the request to a replica it has not failed on and return (dispatch, stream, first output);
raises OpenAIError when no replica is left."""

NOT_RESUMED = frozenset({504})
"""Failures that end the request instead: the deadline (it is the whole request's)."""


@dataclass
class _Delivered:
    """What one sample's client got so far."""

    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    finished: bool = False


class ResumingStream:
    """One prompt's outputs (its n samples) across replicas. The serving loop uses it both as the
    stream and as the dispatch (`finish`, `replica`), like MergedStreams."""

    def __init__(self, start: StartAttempt, attempt: tuple, n: int, max_tokens: int | None) -> None:
        """attempt: the first (dispatch, stream, first output); n: the request's samples; max_tokens:
        its cap on output tokens per sample after context capping, None when unknown."""
        self._start = start
        self.dispatch, self._stream, first = attempt
        self._max_tokens = max_tokens
        self._samples = [_Delivered() for _ in range(n)]
        self._finished = False
        self.num_resumes = 0
        self.first = self._note(first)

    @property
    def replica(self):
        """The replica serving the request now."""
        return self.dispatch.replica

    def _note(self, output: RequestOutput) -> RequestOutput:
        for sample in output.outputs:
            delivered = self._samples[sample.index]
            delivered.token_ids.extend(sample.token_ids)
            if sample.cumulative_logprob is not None:
                delivered.cumulative_logprob = sample.cumulative_logprob
            delivered.finished = delivered.finished or sample.finish_reason is not None
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
        """Leave the failed replica and continue its unfinished samples elsewhere; the output to pass on
        next (the new attempt's first, with the finishes that were lost)."""
        self.dispatch.finish(False)
        await self._stream.aclose()
        unfinished = [(index, s) for index, s in enumerate(self._samples) if not s.finished]
        lost_finishes = [CompletionOutput(index=index, cumulative_logprob=s.cumulative_logprob,
                                          finish_reason=FINISH_LENGTH)
                         for index, s in unfinished if self._all_delivered(s)]
        resumed = [ResumedSample(index, tuple(s.token_ids), s.cumulative_logprob)
                   for index, s in unfinished if not self._all_delivered(s)]
        if not resumed:  # everything was delivered; only the finishes were lost with the replica
            return RequestOutput(request_id="", outputs=lost_finishes, finished=True)
        logger.warning("%s; resuming samples %s after %s delivered tokens", failure.message,
                       [sample.index for sample in resumed], "+".join(str(len(s.token_ids)) for s in resumed))
        self.dispatch, self._stream, first = await self._start(resumed, self.dispatch)
        self.num_resumes += 1
        if lost_finishes:
            first.outputs = sorted(lost_finishes + first.outputs, key=lambda sample: sample.index)
        return first

    def _all_delivered(self, sample: _Delivered) -> bool:
        return self._max_tokens is not None and len(sample.token_ids) >= self._max_tokens

    async def aclose(self) -> None:
        await self._stream.aclose()

    def finish(self, ok: bool | None) -> None:
        self.dispatch.finish(ok)
