"""The scheduler: one rule over token counts, no prefill or decode phases.

Every request has num_computed_tokens (KV already in the cache, or being computed this step) and
num_tokens (prompt plus outputs so far). Each step fills a token budget:

    budget = max_num_batched_tokens
    1. running requests, most urgent first: min(num_tokens - num_computed_tokens, budget) tokens each
       (a decode is a 1-token chunk, an unfinished prompt a prefill chunk); out of KV blocks ->
       preempt the least urgent running request and retry
    2. waiting requests, most urgent first, while blocks, budget and max_num_seqs allow; prefix-cache
       hits start them with more computed tokens. A waiting request that does not fit preempts a
       running one of a strictly less urgent priority (its chunk this step is taken back)

Urgency is (priority, arrival): a lower priority value first, as vLLM's priority scheduling; with
every priority equal (the default 0) this is first come first served. Both queues stay sorted by it.
A preempted request keeps its tokens and is recomputed when it is admitted again: never lost.

num_computed_tokens advances at schedule time; `update` appends the sampled tokens.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Iterable

from scalellm.config import EngineConfig
from scalellm.engine.kv_cache.manager import KVCacheManager
from scalellm.engine.outputs import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from scalellm.engine.request import Request, RequestStatus
from scalellm.protocol.types import EngineLoad, Logprob


@dataclass
class RequestUpdate:
    """What one step produced for one request."""

    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    """Empty unless the request asked for logprobs."""
    finish_reason: str | None = None
    """"stop" or "length" when this step finished the request, else None."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """Decides each step's batch and applies the runner's sampled tokens. Pure Python, no torch.

    Single-threaded: the engine loop calls schedule(), runs the model, then update(); add_request and
    finish_requests come from the same loop between steps.
    """

    def __init__(self, config: EngineConfig, num_blocks: int, group_windows: tuple[int | None, ...] = (None,)) -> None:
        """group_windows: the sliding window (or None) of each KV cache group (kv_cache/groups.py)."""
        self.config = config
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                               group_windows)
        self._requests: dict[str, Request] = {}
        self._waiting: list[Request] = []
        """Sorted by urgency (`_urgency`)."""
        self._running: list[Request] = []
        """Sorted by urgency too: preemption victims come from the end."""
        self._num_preemptions = 0

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def add_request(self, request: Request) -> None:
        """Queue a new request (status WAITING).

        Raises ValueError for a duplicate id, an empty prompt, max_tokens < 1, or a request that could
        never fit: its prompt plus max_tokens needs more KV blocks than the whole cache holds. Rejecting
        up front guarantees that any single request fits alone, so preemption always makes progress.
        """
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        if request.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: send at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        self._check_fits(request)
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        bisect.insort(self._waiting, request, key=_urgency)

    def schedule(self) -> SchedulerOutput:
        """Build this step's batch; advances num_computed_tokens of every scheduled request."""
        output = SchedulerOutput()
        budget = self._schedule_running(self.config.max_num_batched_tokens, output)
        if not output.preempted_request_ids:
            self._schedule_waiting(budget, output)
        return output

    def update(self, scheduler_output: SchedulerOutput,
               runner_output: ModelRunnerOutput) -> list[RequestUpdate]:
        """Append the sampled tokens, check stop conditions, and free finished requests' blocks.

        Only chunks that needed a sample produce an update; the runner must return a token for each.
        Requests that were preempted or finished since schedule() (aborts, stop strings) are skipped:
        their sampled tokens are dropped.
        """
        now = time.time()
        updates = []
        for chunk in scheduler_output.chunks:
            request = chunk.request
            if not self._is_running(request) or not chunk.needs_sample:
                continue
            token_id = runner_output.sampled_token_ids.get(request.request_id)
            assert token_id is not None, f"the runner sampled no token for {request.request_id!r}"
            updates.append(self._append_token(request, token_id, runner_output.logprobs, now))
        if any(update.finished for update in updates):
            self._running = [request for request in self._running if not request.is_finished]
        return updates

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests in any state (waiting, running, preempted) with the given finished status,
        freeing their blocks at once. Unknown or already finished ids are ignored.

        Used for aborts and for stop strings found by the detokenizer. Returns the requests finished.
        """
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        finished = [self._requests[rid] for rid in dict.fromkeys(request_ids) if rid in self._requests]
        if not finished:
            return []
        for request in finished:
            request.status = status
            self._release(request)
        self._running = [request for request in self._running if not request.is_finished]
        self._waiting = [request for request in self._waiting if not request.is_finished]
        return finished

    def get_load(self) -> EngineLoad:
        """A snapshot for routing and metrics."""
        kv = self.kv_cache_manager
        return EngineLoad(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_total_blocks,
            num_tokens_in_flight=sum(_tokens_in_flight(request) for request in self._requests.values()),
            prefix_cache_queried_tokens=kv.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=kv.prefix_cache_hit_tokens,
            num_preemptions=self._num_preemptions,
        )

    # -- scheduling ---------------------------------------------------------------------------------

    def _schedule_running(self, budget: int, output: SchedulerOutput) -> int:
        """Schedule running requests in order; returns the budget left."""
        index = 0
        while index < len(self._running) and budget > 0:
            request = self._running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new_tokens <= 0:
                index += 1
                continue
            if not self._allocate_or_preempt(request, num_new_tokens, output):
                break
            output.chunks.append(self._make_chunk(request, num_new_tokens))
            budget -= num_new_tokens
            index += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, output: SchedulerOutput) -> bool:
        """Allocate, preempting the newest running request until it fits; False if the request
        itself was preempted. Victims come from the end of the running list, after the current
        request, so a request already scheduled this step is never preempted."""
        while not self.kv_cache_manager.allocate_slots(request, num_new_tokens):
            victim = self._running.pop()
            self._preempt(victim, output)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, budget: int, output: SchedulerOutput) -> None:
        """Admit waiting requests most urgent first; stop at the first that does not fit, unless it
        can preempt a less urgent running request to make room."""
        kv = self.kv_cache_manager
        while self._waiting and budget > 0:
            request = self._waiting[0]
            if len(self._running) >= self.config.max_num_seqs:
                given_back = self._preempt_less_urgent(request, output)
                if given_back is None:
                    break
                budget += given_back
                continue
            num_cached_tokens, cached_blocks = kv.get_computed_blocks(request)
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
            if not kv.allocate_slots(request, num_new_tokens, new_computed_blocks=cached_blocks):
                given_back = self._preempt_less_urgent(request, output)
                if given_back is None:
                    break
                budget += given_back
                continue
            self._waiting.pop(0)
            self._admit(request, num_cached_tokens)
            output.chunks.append(self._make_chunk(request, num_new_tokens))
            budget -= num_new_tokens

    def _preempt_less_urgent(self, request: Request, output: SchedulerOutput) -> int | None:
        """Preempt the least urgent running request if it is strictly less urgent than `request`,
        taking back its chunk of this step; the tokens given back to the budget, None if none."""
        if not self._running or _priority(self._running[-1]) <= _priority(request):
            return None
        victim = self._running.pop()
        chunks = [chunk for chunk in output.chunks if chunk.request is victim]
        output.chunks = [chunk for chunk in output.chunks if chunk.request is not victim]
        self._preempt(victim, output)
        return sum(chunk.num_new_tokens for chunk in chunks)

    def _admit(self, request: Request, num_cached_tokens: int) -> None:
        if request.scheduled_time == 0.0:
            request.scheduled_time = time.time()
            request.num_cached_tokens = num_cached_tokens
        request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.RUNNING
        bisect.insort(self._running, request, key=_urgency)

    def _make_chunk(self, request: Request, num_new_tokens: int) -> ScheduledChunk:
        chunk = ScheduledChunk(
            request=request,
            start_position=request.num_computed_tokens,
            num_new_tokens=num_new_tokens,
            block_ids=self.kv_cache_manager.get_block_ids(request),
        )
        if request.num_computed_tokens < request.num_prompt_tokens:
            if request.prefill_chunks is None:
                request.prefill_chunks = []
            request.prefill_chunks.append((time.time(), num_new_tokens))
        request.num_computed_tokens += num_new_tokens
        return chunk

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        """Free the request's blocks and put it back in the waiting queue by its urgency; its output
        tokens stay in all_token_ids and are recomputed with the prompt when it is rescheduled."""
        self.kv_cache_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        bisect.insort(self._waiting, request, key=_urgency)
        output.preempted_request_ids.append(request.request_id)

    # -- updating -----------------------------------------------------------------------------------

    def _append_token(self, request: Request, token_id: int, logprobs: dict[str, dict[int, Logprob]],
                      now: float) -> RequestUpdate:
        token_logprobs = logprobs.get(request.request_id)
        request.append_output_token(token_id, token_logprobs)
        if request.first_token_time == 0.0:
            request.first_token_time = now
        request.last_token_time = now
        update = RequestUpdate(request, [token_id], [token_logprobs] if token_logprobs is not None else [])
        status = check_stop(request, token_id)
        if status is not None:
            request.status = status
            update.finish_reason = status.finish_reason
            self._release(request)
        return update

    def _is_running(self, request: Request) -> bool:
        return request.status is RequestStatus.RUNNING and self._requests.get(request.request_id) is request

    def _release(self, request: Request) -> None:
        """Forget a finished request and free its blocks (the list cleanup is the caller's)."""
        self.kv_cache_manager.free(request)
        del self._requests[request.request_id]

    def _check_fits(self, request: Request) -> None:
        # The last output token is never fed back, so the KV holds at most prompt + max_tokens - 1 tokens.
        max_num_kv_tokens = request.num_tokens + request.max_tokens - request.num_output_tokens - 1
        kv = self.kv_cache_manager
        num_blocks_needed = kv.max_blocks_for(max(max_num_kv_tokens, 1), self.config.max_num_batched_tokens)
        if num_blocks_needed > kv.num_total_blocks:
            capacity = kv.max_tokens_per_request(self.config.max_num_batched_tokens)
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_num_kv_tokens} tokens of KV cache "
                f"(prompt plus max_tokens) but the cache holds {capacity}: lower max_tokens or the "
                f"prompt length, or give the engine more KV cache memory")


def check_stop(request: Request, token_id: int) -> RequestStatus | None:
    """The finished status the just-appended token_id gives the request, or None to go on.

    A grammar that accepted its stop token stops the request first. Then in order: EOS or another EOS id (unless ignore_eos), then stop_token_ids -> FINISHED_STOPPED, both only once more
    than min_tokens were generated; then max_tokens -> FINISHED_LENGTH. EOS leaves stop_reason None;
    a stop token id sets stop_reason to that id.
    """
    params = request.sampling_params
    if request.grammar is not None and request.grammar.terminated:
        return RequestStatus.FINISHED_STOPPED  # the grammar accepted its stop token: nothing may follow
    if request.num_output_tokens > params.min_tokens:
        if not params.ignore_eos and (token_id == request.eos_token_id or token_id in request.other_eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if request.num_output_tokens >= request.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None


def _priority(request: Request) -> int:
    """The request's priority: lower is more urgent; none given is 0 (vLLM's convention)."""
    return request.sampling_params.priority or 0


def _urgency(request: Request) -> tuple[int, float]:
    """The order of both queues: priority, then arrival (first come first served within a priority)."""
    return (request.sampling_params.priority or 0, request.arrival_time)


def _tokens_in_flight(request: Request) -> int:
    """Prompt tokens still to compute plus output tokens still allowed."""
    num_prompt_left = max(0, request.num_prompt_tokens - request.num_computed_tokens)
    return num_prompt_left + max(0, request.max_tokens - request.num_output_tokens)
