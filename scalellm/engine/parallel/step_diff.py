"""Each step rank 0 sends the workers what changed, not the whole batch (as vLLM v1 does).

Workers keep a mirror of every running request: its tokens and its block table. For each scheduled
chunk rank 0 sends

    a request new to the workers (first scheduled, or rescheduled after preemption):
        all its tokens and its whole block table
    a request they know (a decode, the next prefill chunk):
        only the tokens appended since (the token sampled last step) and the blocks added

plus the ids to forget (finished, aborted or preempted since the last step). A request's tokens and
its block table only grow while it runs, so a mirror rebuilt from these diffs equals rank 0's state,
and build_step_inputs gives the same tensors on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from scalellm.engine.outputs import ScheduledChunk, SchedulerOutput
from scalellm.engine.parallel.messages import ChunkDiff, StepDiff


class DiffEncoder:
    """Rank 0's record of what the workers know of each request."""

    def __init__(self) -> None:
        self._sent: dict[str, tuple[int, int]] = {}
        """request id -> (tokens sent, blocks sent)."""
        self._removed: list[str] = []

    def forget(self, request_ids: Iterable[str]) -> None:
        """Requests finished or aborted: the next diff tells the workers to drop them."""
        for request_id in request_ids:
            if self._sent.pop(request_id, None) is not None:
                self._removed.append(request_id)

    def encode(self, scheduled: SchedulerOutput) -> StepDiff:
        """The diff of one step; records that the workers now know its requests' tokens and blocks."""
        self.forget(scheduled.preempted_request_ids)
        diff = StepDiff(self._removed, [])
        self._removed = []
        for chunk in scheduled.chunks:
            request = chunk.request
            sent = self._sent.get(request.request_id)
            num_tokens_sent, num_blocks_sent = sent if sent is not None else (0, 0)
            diff.chunks.append(ChunkDiff(
                request.request_id, chunk.start_position, chunk.num_new_tokens,
                request.all_token_ids[num_tokens_sent:], chunk.block_ids[num_blocks_sent:], sent is None))
            self._sent[request.request_id] = (request.num_tokens, len(chunk.block_ids))
        return diff

    @property
    def num_known_requests(self) -> int:
        return len(self._sent)


@dataclass(eq=False)
class MirroredRequest:
    """What a worker knows of a request: the fields build_step_inputs reads from a Request."""

    request_id: str
    all_token_ids: list[int]
    block_ids: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


class RequestMirror:
    """A worker's copy of the running requests, kept up to date by StepDiffs."""

    def __init__(self) -> None:
        self._requests: dict[str, MirroredRequest] = {}

    def __len__(self) -> int:
        return len(self._requests)

    def apply(self, diff: StepDiff) -> SchedulerOutput:
        """Update the mirror and return the step's SchedulerOutput, equal to rank 0's."""
        for request_id in diff.removed_request_ids:
            self._requests.pop(request_id, None)
        output = SchedulerOutput()
        for chunk in diff.chunks:
            if chunk.is_new:
                request = MirroredRequest(chunk.request_id, list(chunk.new_token_ids), list(chunk.new_block_ids))
                self._requests[chunk.request_id] = request
            else:
                request = self._requests[chunk.request_id]
                request.all_token_ids.extend(chunk.new_token_ids)
                request.block_ids.extend(chunk.new_block_ids)
            output.chunks.append(ScheduledChunk(request, chunk.start_position, chunk.num_new_tokens,
                                                list(request.block_ids)))
        return output
