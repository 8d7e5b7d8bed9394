"""Folding consecutive streamed deltas of one request into one (when a consumer falls behind)."""

from __future__ import annotations

from scalellm.protocol.types import CompletionOutput, RequestOutput


def merge_delta(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta equivalent to `earlier` followed by `later` (same request)."""
    by_index = {o.index: o for o in earlier.outputs}
    for output in later.outputs:
        base = by_index.get(output.index)
        by_index[output.index] = output if base is None else _merge_sample(base, output)
    later.outputs = sorted(by_index.values(), key=lambda o: o.index)
    return later


def _merge_sample(base: CompletionOutput, new: CompletionOutput) -> CompletionOutput:
    logprobs = None
    if base.logprobs is not None or new.logprobs is not None:
        logprobs = (base.logprobs or []) + (new.logprobs or [])
    return CompletionOutput(index=new.index, text=base.text + new.text, token_ids=base.token_ids + new.token_ids,
                            cumulative_logprob=new.cumulative_logprob, logprobs=logprobs,
                            finish_reason=new.finish_reason, stop_reason=new.stop_reason)
