"""The replica's spans of one request, made when it ends from its stage timestamps.

    replica.generate   replica_receive ─────────────────────────────────────────────▶ end
      tokenize         replica_receive → queued          (chat template + tokenizer)
      queue            queued → scheduled                (waiting for a batch slot and KV blocks)
      prefill          scheduled → first_token
        prefill_chunk  one per chunk of the prompt, from its step to the next chunk's (the last: first_token)
      decode           first_token → last_token
      detokenize       last_token → end                  (the last token's text, stop strings, hand-off;
                                                           earlier tokens are detokenized during decode)
"""

from __future__ import annotations

import logging

from opentelemetry.trace import SpanKind

from scalellm.protocol.types import RequestMetrics, SamplingParams
from scalellm.tracing.provider import Tracing

logger = logging.getLogger(__name__)


def record_replica_spans(tracing: Tracing, carrier: dict[str, str], request_id: str, model: str,
                         params: SamplingParams, metrics: RequestMetrics, usage: tuple[int, int],
                         finish_reasons: list[str], end_s: float, error: str | None = None) -> None:
    """Export the request's replica spans, children of the gateway span in `carrier` (a new trace
    without one). `usage` is (prompt tokens, generated tokens)."""
    attributes = {
        "gen_ai.operation.name": "generate", "gen_ai.request.model": model, "gen_ai.response.model": model,
        "gen_ai.response.id": request_id, "scalellm.request_id": request_id,
        "gen_ai.usage.input_tokens": usage[0], "gen_ai.usage.output_tokens": usage[1],
        "gen_ai.response.finish_reasons": finish_reasons, "scalellm.cached_tokens": metrics.num_cached_tokens,
        **request_attributes(params)}
    root = tracing.start("replica.generate", metrics.replica_receive_time, tracing.extract(carrier),
                         SpanKind.SERVER, attributes)
    m = metrics
    queued = m.queued_time or m.scheduled_time
    tracing.span("tokenize", root, m.replica_receive_time, queued)
    tracing.span("queue", root, queued, m.scheduled_time)
    prefill = tracing.span("prefill", root, m.scheduled_time, m.first_token_time or end_s,
                           {"scalellm.prefill_chunks": len(m.prefill_chunks or ())})
    if prefill is not None and m.prefill_chunks:
        _chunk_spans(tracing, prefill, m.prefill_chunks, m.first_token_time or end_s)
    tracing.span("decode", root, m.first_token_time, m.last_token_time)
    tracing.span("detokenize", root, m.last_token_time, end_s)
    tracing.end(root, end_s, error)


def request_attributes(params: SamplingParams) -> dict:
    """The GenAI request attributes of the sampling parameters."""
    attributes = {"gen_ai.request.temperature": params.temperature, "gen_ai.request.top_p": params.top_p}
    if params.max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = params.max_tokens
    if params.n != 1:
        attributes["gen_ai.request.choice.count"] = params.n
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    return attributes


def _chunk_spans(tracing: Tracing, prefill, chunks: list[tuple[float, int]], end_s: float) -> None:
    ends = [start for start, _ in chunks[1:]] + [end_s]
    for index, ((start, num_tokens), end) in enumerate(zip(chunks, ends)):
        tracing.span("prefill_chunk", prefill, start, end,
                     {"scalellm.chunk_index": index, "scalellm.chunk_tokens": num_tokens})


class ReplicaRequestTrace:
    """What one request's replica spans need beyond its RequestMetrics, gathered while it streams."""

    __slots__ = ("tracing", "carrier", "request_id", "model", "params", "metrics", "num_prompt_tokens",
                 "num_generated_tokens", "finish_reasons")

    def __init__(self, tracing: Tracing, carrier: dict[str, str], request_id: str, model: str,
                 params: SamplingParams, metrics: RequestMetrics) -> None:
        self.tracing, self.carrier, self.request_id, self.model = tracing, carrier, request_id, model
        self.params, self.metrics = params, metrics
        self.num_prompt_tokens = self.num_generated_tokens = 0
        self.finish_reasons: list[str] = []

    def observe(self, output) -> None:
        """Count one delta RequestOutput."""
        self.num_prompt_tokens = self.num_prompt_tokens or output.num_prompt_tokens
        for completion in output.outputs:
            self.num_generated_tokens += len(completion.token_ids)
            if completion.finish_reason is not None:
                self.finish_reasons.append(completion.finish_reason)

    def end(self, end_s: float, error: str | None) -> None:
        """Export the spans (never raises: tracing must not fail a request)."""
        try:
            record_replica_spans(self.tracing, self.carrier, self.request_id, self.model, self.params,
                                 self.metrics, (self.num_prompt_tokens, self.num_generated_tokens),
                                 self.finish_reasons, end_s, error)
        except Exception:  # noqa: BLE001
            logger.exception("tracing: could not record the spans of %s", self.request_id)
