"""The tracer of one process: an OTLP exporter behind a batch span processor, and span helpers.

Imported only when tracing is on. Spans are made after the fact with explicit timestamps
(`span`), so a stage costs nothing while it runs. Spans the exporter could not deliver, and spans
the full queue turned away, are counted (`num_dropped`, and `on_dropped` for the gateway's metric).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Mapping, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scalellm.tracing.config import GRPC, TracingConfig

logger = logging.getLogger(__name__)
_PROPAGATOR = TraceContextTextMapPropagator()
_SHUTDOWN_TIMEOUT_S = 3.0
_DEFAULT_MAX_QUEUE = 2048  # the SDK's default, OTEL_BSP_MAX_QUEUE_SIZE overrides it
_LOG_EVERY_S = 60.0


class Tracing:
    """A TracerProvider of its own (not the global one) exporting to `config`'s endpoint."""

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self.on_dropped: Callable[[int], None] | None = None
        self._counts = _Counts()
        exporter = _CountingExporter(exporter or _otlp_exporter(config), self._counts, self._dropped)
        max_queue = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", _DEFAULT_MAX_QUEUE))
        self._processor = BatchSpanProcessor(exporter, max_queue_size=max_queue)
        self._provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
        self._provider.add_span_processor(_QueueGuard(self._processor, max_queue, self._counts, self._dropped))
        self.tracer = self._provider.get_tracer("scalellm")

    @property
    def num_dropped(self) -> int:
        """Spans lost so far: turned away by the full queue or not accepted by the collector."""
        return self._counts.dropped

    def extract(self, carrier: Mapping[str, str]) -> Context | None:
        """The remote parent in a W3C carrier ({"traceparent": ...}); None (a new trace) when it is
        missing or malformed."""
        context = _PROPAGATOR.extract(carrier)
        return context if trace.get_current_span(context).get_span_context().is_valid else None

    @staticmethod
    def inject(span) -> dict[str, str]:
        """The W3C carrier of `span`, for the next hop."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
        return carrier

    def start(self, name: str, start_s: float, parent: Context | None = None, kind=SpanKind.INTERNAL,
              attributes: Mapping | None = None):
        """An open span begun at `start_s` (time.time() seconds); end it with `end`."""
        return self.tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                                      start_time=_ns(start_s))

    @staticmethod
    def end(span, end_s: float, error: str | None = None) -> None:
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=_ns(end_s))

    def span(self, name: str, parent_span, start_s: float, end_s: float, attributes: Mapping | None = None):
        """A finished child of `parent_span` from `start_s` to `end_s`; skipped (None) for a stage
        never reached (a zero timestamp)."""
        if not start_s or not end_s:
            return None
        span = self.tracer.start_span(name, context=trace.set_span_in_context(parent_span),
                                      attributes=attributes, start_time=_ns(start_s))
        span.end(end_time=_ns(max(end_s, start_s)))
        return span

    def shutdown(self) -> None:
        """Export what is queued, waiting at most a few seconds for an unreachable collector (the
        export then goes on in a daemon thread that dies with the process)."""
        stopping = threading.Thread(target=self._processor.shutdown, name="tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(_SHUTDOWN_TIMEOUT_S)
        if self._counts.dropped:
            logger.warning("tracing: %d spans dropped in all", self._counts.dropped)

    def _dropped(self, count: int) -> None:
        self._counts.dropped += count
        if self.on_dropped is not None:
            self.on_dropped(count)
        self._counts.maybe_log()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _otlp_exporter(config: TracingConfig) -> SpanExporter:
    if config.protocol == GRPC:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint, insecure=config.insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=config.endpoint)


class _Counts:
    """Spans ended, handed to the exporter, and dropped (updated from two threads; approximate is enough)."""

    def __init__(self) -> None:
        self.ended = self.exported = self.dropped = 0
        self._lock = threading.Lock()
        self._last_log = 0.0
        self._logged = 0

    def maybe_log(self) -> None:
        import time

        with self._lock:
            now = time.monotonic()
            if now - self._last_log < _LOG_EVERY_S:
                return
            self._last_log, new = now, self.dropped - self._logged
            self._logged = self.dropped
        logger.warning("tracing: %d spans dropped (collector unreachable or too slow)", new)


class _QueueGuard(SpanProcessor):
    """Counts a span that the batch processor's full queue will drop, then hands every span on."""

    def __init__(self, processor: BatchSpanProcessor, max_queue: int, counts: _Counts,
                 dropped: Callable[[int], None]) -> None:
        self._processor = processor
        self._counts = counts
        self._dropped = dropped
        self._max_queue = max_queue

    def on_start(self, span, parent_context=None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        counts = self._counts
        counts.ended += 1
        if counts.ended - 1 - counts.exported - counts.dropped >= self._max_queue:
            self._dropped(1)  # the deque drops its oldest span to make room
        self._processor.on_end(span)

    def shutdown(self) -> None:
        pass  # Tracing.shutdown ends the batch processor with a bounded wait

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._processor.force_flush(timeout_millis)


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting the spans of batches the collector did not take."""

    def __init__(self, exporter: SpanExporter, counts: _Counts, dropped: Callable[[int], None]) -> None:
        self._exporter = exporter
        self._counts = counts
        self._dropped = dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._counts.exported += len(spans)
        try:
            result = self._exporter.export(spans)
        except Exception:  # noqa: BLE001 - an exporter failure is a lost batch, never the caller's problem
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._counts.exported -= len(spans)
            self._dropped(len(spans))
        return result

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)
