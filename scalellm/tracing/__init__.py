"""OpenTelemetry tracing of a request across the gateway and its replica.

    client ──traceparent──▶ gateway span "POST /v1/chat/completions"   (service.name scalellm-gateway)
                              ├─ admit, parse, route, wait_first_chunk, stream
                              └─ replica span "replica.generate"       (service.name scalellm-replica)
                                   ├─ tokenize, queue, prefill (one child per prefill chunk), decode
                                   └─ detokenize

The W3C trace context travels in each GenerateRequest's `trace_context` map: one gRPC Session call
carries many requests, so the call's metadata cannot carry a request's context. Spans are built once a
request ends, from the stage timestamps both processes keep anyway, and handed to a batch processor
whose thread exports them over OTLP: the request path never waits on the collector.

Tracing is off unless an OTLP endpoint is configured (`--otlp-traces-endpoint`, or the standard
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`). Off, nothing here is imported
by the request path and no object is created per request; the OpenTelemetry packages (the `otel`
extra) are imported only when it is on.
"""

from __future__ import annotations

from scalellm.tracing.config import TracingConfig, tracing_config

__all__ = ["TracingConfig", "tracing_config", "start_tracing"]


def start_tracing(config: TracingConfig | None):
    """The process's `Tracing` for `config`, or None when tracing is off (config None)."""
    if config is None:
        return None
    from scalellm.tracing.provider import Tracing

    return Tracing(config)
