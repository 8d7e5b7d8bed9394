"""The gateway's spans of one request (scalellm/tracing has the picture of the whole trace).

    POST /v1/chat/completions   gateway_receive ─────────────────────────────▶ response sent
      admit                     receive → admitted        (API key, draining, rate limit, in-flight cap)
      parse                     admitted → parsed         (body → prompt and sampling parameters)
      route                     parsed → routed           (the policy's pick; failed attempts included)
      wait_first_chunk          routed → first output     (the replica's span is a child of the root)
      stream                    first output → sent       (SSE events, or the whole body)

The root span starts when the request is admitted for tracing, so its context can travel to the
replica; the stage spans are made when the request ends, from the RequestRecord's timestamps.
Only built when tracing is on (imported by GatewayApp then).
"""

from __future__ import annotations

import logging

from opentelemetry.trace import SpanKind

from scalellm.tracing.provider import Tracing
from scalellm.tracing.replica import request_attributes

logger = logging.getLogger(__name__)

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
               "/v1/responses": "responses"}


class GatewayTracing:
    """Starts a request's root span and, when it ends, records its stage spans."""

    def __init__(self, tracing: Tracing, on_dropped=None) -> None:
        self.tracing = tracing
        tracing.on_dropped = on_dropped

    def begin(self, traceparent: bytes | None, tracestate: bytes | None, record) -> None:
        """Open the root span of `record` (a child of the client's valid `traceparent`, else a new trace)
        and set `record.trace` to it."""
        carrier = {}
        if traceparent:
            carrier["traceparent"] = traceparent.decode("latin-1")
            if tracestate:
                carrier["tracestate"] = tracestate.decode("latin-1")
        parent = self.tracing.extract(carrier) if carrier else None
        record.trace = self.tracing.start(f"POST {record.route}", record.receive_time, parent, SpanKind.SERVER,
                                          {"http.request.method": "POST", "url.path": record.route,
                                           "scalellm.request_id": record.request_id,
                                           "gen_ai.operation.name": _OPERATIONS.get(record.route, "generate")})

    @staticmethod
    def trace_id(record) -> str:
        """The request's trace id as 32 hex digits (for its access-log line)."""
        return format(record.trace.get_span_context().trace_id, "032x")

    def carrier(self, record) -> dict[str, str]:
        """The W3C context to send to the replica with the request."""
        return self.tracing.inject(record.trace)

    def end(self, record, status: int, end_s: float, error: str | None, parsed, model: str | None) -> None:
        """Record the stage spans and end the root span (never raises)."""
        try:
            self._end(record, status, end_s, error, parsed, model)
        except Exception:  # noqa: BLE001 - tracing must not fail a request
            logger.exception("tracing: could not record the spans of %s", record.request_id)

    def _end(self, record, status: int, end_s: float, error: str | None, parsed, model: str | None) -> None:
        root, span = record.trace, self.tracing.span
        span("admit", root, record.receive_time, record.admitted_time)
        span("parse", root, record.admitted_time, record.parsed_time)
        span("route", root, record.parsed_time, record.routed_time, {"scalellm.replica": record.replica,
                                                                      "scalellm.attempts": record.attempts})
        span("wait_first_chunk", root, record.routed_time, record.first_output_time)
        span("stream", root, record.first_output_time, end_s)
        attributes = {"http.response.status_code": status, "gen_ai.response.id": record.request_id,
                      "gen_ai.usage.input_tokens": record.num_prompt_tokens,
                      "gen_ai.usage.output_tokens": record.num_output_tokens, "scalellm.replica": record.replica,
                      "scalellm.api_key_id": record.key_id or ""}
        if model:
            attributes["gen_ai.request.model"] = attributes["gen_ai.response.model"] = model
        if record.finish_reason:
            attributes["gen_ai.response.finish_reasons"] = [record.finish_reason]
        if parsed is not None:
            attributes.update(request_attributes(parsed.params))
        root.set_attributes(attributes)
        self.tracing.end(root, end_s, error if status >= 400 else None)

    def shutdown(self) -> None:
        self.tracing.shutdown()
