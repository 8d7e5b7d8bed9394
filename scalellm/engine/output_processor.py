"""Turning the engine core's per-step token updates into RequestOutputs: detokenize, find stop strings,
group the n samples of a request, and keep stage timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.engine.detokenizer import IncrementalDetokenizer, decode_logprobs
from scalellm.engine.request import Request
from scalellm.engine.scheduler import RequestUpdate
from scalellm.protocol.types import (FINISH_ABORT, FINISH_STOP, CompletionOutput, RequestMetrics, RequestOutput,
                                     SamplingParams)


@dataclass
class _Sample:
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    pending: CompletionOutput | None = None
    """The delta not yet reported (delta mode)."""


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, _Sample]
    metrics: RequestMetrics
    delta: bool
    final_only: bool = False
    """Delta mode, but the deltas are folded and emitted once, when the request finishes."""

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]
    """One per request that changed this step (delta mode) or finished (whole-result and final-only modes)."""
    stopped_sample_ids: list[str]
    """Samples that hit a stop string: the engine core must finish them."""


class OutputProcessor:
    """Tracks every request in flight on the front-end side of the engine."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        self._sample_owner: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, samples: list[Request],
                    metrics: RequestMetrics | None = None, delta: bool = True, final_only: bool = False) -> None:
        """Track a request. delta: report only what is new at each step, else the whole result once
        finished. final_only (with delta): hold the deltas and report them folded into one output when
        the request finishes, which equals the concatenation of the delta outputs (after resumed output too:
        a sample that starts with output reports only what follows it, its cumulative logprob continuing
        from Request.resumed_cumulative_logprob)."""
        params = samples[0].sampling_params
        state = _RequestState(request_id, prompt, samples[0].prompt_token_ids, params, {},
                              metrics or RequestMetrics(), delta, final_only and delta)
        for sample in samples:
            detokenizer = IncrementalDetokenizer(self.tokenizer, sample.prompt_token_ids, params)
            if sample.output_token_ids:  # resumed: its delivered output is not reported again
                detokenizer.resume(sample.output_token_ids)
            cumulative_logprob = sample.resumed_cumulative_logprob if params.logprobs is not None else None
            state.samples[sample.request_id] = _Sample(
                sample.sample_index, sample, detokenizer, token_ids=list(sample.output_token_ids),
                logprobs=[] if params.logprobs is not None else None, cumulative_logprob=cumulative_logprob)
            self._sample_owner[sample.request_id] = state
        self._states[request_id] = state

    def sample_ids(self, request_id: str) -> list[str]:
        state = self._states.get(request_id)
        return list(state.samples) if state else []

    def has_request(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, updates: list[RequestUpdate]) -> ProcessedOutputs:
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        for update in updates:
            state = self._sample_owner.get(update.request.request_id)
            if state is None:
                continue
            if self._apply(state.samples[update.request.request_id], update):
                stopped.append(update.request.request_id)
            touched[state.request_id] = state
        outputs = [out for state in touched.values() if (out := self._emit(state)) is not None]
        return ProcessedOutputs(outputs, stopped)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every unfinished sample of a request with "abort"; returns its last output."""
        state = self._states.get(request_id)
        if state is None:
            return None
        for sample in state.samples.values():
            if sample.finish_reason is None:
                sample.finish_reason = FINISH_ABORT
                sample.pending = sample.pending or CompletionOutput(index=sample.index)
                sample.pending.finish_reason = FINISH_ABORT
        return self._emit(state)

    def _apply(self, sample: _Sample, update: RequestUpdate) -> bool:
        """Fold one update into a sample; True when a stop string ended it here."""
        if sample.finish_reason is not None:
            return False
        new_ids = update.new_token_ids
        stop_string = sample.detokenizer.update(new_ids)
        hit_stop_string = stop_string is not None
        finish_reason = FINISH_STOP if hit_stop_string else update.finish_reason
        if hit_stop_string:
            sample.stop_reason = stop_string
        elif finish_reason is not None:
            sample.stop_reason = update.request.stop_reason
        new_logprobs = None
        if sample.logprobs is not None:
            new_logprobs = [decode_logprobs(self.tokenizer, lp) for lp in update.new_logprobs]
            sample.logprobs.extend(new_logprobs)
            sample.cumulative_logprob += sum(lp[t].logprob for lp, t in zip(new_logprobs, new_ids))
        sample.token_ids.extend(new_ids)
        sample.finish_reason = finish_reason
        delta = sample.pending or CompletionOutput(index=sample.index, logprobs=[] if new_logprobs is not None else None)
        delta.text += sample.detokenizer.get_next_delta(finished=finish_reason is not None)
        delta.token_ids.extend(new_ids)
        if new_logprobs is not None:
            delta.logprobs.extend(new_logprobs)
        delta.cumulative_logprob = sample.cumulative_logprob
        delta.finish_reason, delta.stop_reason = finish_reason, sample.stop_reason
        sample.pending = delta
        return hit_stop_string and not update.finished

    def _emit(self, state: _RequestState) -> RequestOutput | None:
        finished = state.finished
        if state.final_only and not finished:
            return None  # the samples' pending deltas keep growing until the end
        if state.delta:
            outputs = [s.pending for s in state.samples.values() if s.pending is not None]
            for sample in state.samples.values():
                sample.pending = None
        elif finished:
            outputs = [self._whole(s) for s in state.samples.values()]
        else:
            return None
        if finished:
            self._forget(state)
        outputs.sort(key=lambda o: o.index)
        return RequestOutput(
            request_id=state.request_id, outputs=outputs, finished=finished, prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids, num_prompt_tokens=len(state.prompt_token_ids),
            metrics=self._metrics(state) if finished else None)

    def _whole(self, sample: _Sample) -> CompletionOutput:
        return CompletionOutput(index=sample.index, text=sample.detokenizer.output_text,
                                token_ids=sample.token_ids, cumulative_logprob=sample.cumulative_logprob,
                                logprobs=sample.logprobs, finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason)

    def _metrics(self, state: _RequestState) -> RequestMetrics:
        metrics = state.metrics
        requests = [s.request for s in state.samples.values()]
        metrics.scheduled_time = min((r.scheduled_time for r in requests if r.scheduled_time), default=0.0)
        metrics.first_token_time = min((r.first_token_time for r in requests if r.first_token_time), default=0.0)
        metrics.last_token_time = max((r.last_token_time for r in requests), default=0.0)
        metrics.num_cached_tokens = max((r.num_cached_tokens for r in requests), default=0)
        metrics.prefill_chunks = requests[0].prefill_chunks if requests else None
        return metrics

    def _forget(self, state: _RequestState) -> None:
        self._states.pop(state.request_id, None)
        for sample_id in state.samples:
            self._sample_owner.pop(sample_id, None)
