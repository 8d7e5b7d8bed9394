"""One sequence inside the engine: its tokens, how many are computed, and its state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from scalellm.protocol.types import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, Logprob, SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FINISH_STOP,
    RequestStatus.FINISHED_LENGTH: FINISH_LENGTH,
    RequestStatus.FINISHED_ABORTED: FINISH_ABORT,
}


@dataclass(eq=False)
class Request:
    """A single sequence. A request with n > 1 samples becomes n of these, sharing the prompt.

    The one scheduling rule: tokens [0, num_computed_tokens) have KV in the cache; the scheduler
    brings num_computed_tokens up to num_tokens, and a sample is drawn whenever it gets there.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int
    """Output tokens allowed, already capped by the context length."""
    eos_token_id: int | None = None
    other_eos_token_ids: tuple[int, ...] = ()
    """Further ids that end generation like EOS (a model's generation config may list several)."""
    sample_index: int = 0
    """Which of the parent request's n samples this is (seeded sampling offsets the seed by it)."""
    arrival_time: float = field(default_factory=time.time)
    all_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    resumed_cumulative_logprob: float = 0.0
    """The sum of the logprobs of the output tokens it started with (delivered before a failover, as
    reported with them); the reported cumulative logprob continues from it."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first scheduled."""
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    scheduled_time: float = 0.0
    first_token_time: float = 0.0
    last_token_time: float = 0.0
    prefill_chunks: list[tuple[float, int]] | None = None
    """(time scheduled, tokens) of each chunk of the prompt computed, in order (recomputation after a
    preemption included); the replica's trace spans read them."""
    grammar: object | None = None
    """A RequestGrammar (engine/structured) when the output must follow one; advanced by each token."""

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int, logprobs: dict[int, Logprob] | None = None) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
