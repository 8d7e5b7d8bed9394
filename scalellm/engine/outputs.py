"""What passes between the scheduler and the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.engine.request import Request
from scalellm.protocol.types import Logprob


@dataclass
class ScheduledChunk:
    """Tokens of one request to compute in this step.

    The tokens are request.all_token_ids[start_position : start_position + num_new_tokens]; their
    KV goes to the slots that block_ids gives for those positions (position p lives in block
    block_ids[p // block_size], offset p % block_size).
    """

    request: Request
    start_position: int
    num_new_tokens: int
    block_ids: list[int]

    @property
    def needs_sample(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a next token is drawn."""
        return self.start_position + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's batch: decodes first, then prefill chunks, in the order the runner lays them out."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class ModelRunnerOutput:
    """Sampled tokens for the chunks that needed one, by request id."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, dict[int, Logprob]] = field(default_factory=dict)
    """Only for requests that asked for logprobs: the chosen token plus the top alternatives."""
