"""Tracing configuration, the lost-span accounting, and that tracing off costs no import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalellm.tracing.config import GRPC, HTTP, tracing_config


@pytest.mark.parametrize("endpoint, protocol, target, insecure", [
    ("http://collector:4318/v1/traces", HTTP, "http://collector:4318/v1/traces", True),
    ("https://collector/v1/traces", HTTP, "https://collector/v1/traces", True),
    ("grpc://collector:4317", GRPC, "collector:4317", True),
    ("grpcs://collector:4317", GRPC, "collector:4317", False),
    ("collector:4317", GRPC, "collector:4317", True),
    ("[::1]:4317", GRPC, "[::1]:4317", True),
])
def test_endpoint_forms_pick_the_protocol(endpoint, protocol, target, insecure):
    config = tracing_config(endpoint, "scalellm-gateway", environ={})
    assert (config.protocol, config.endpoint, config.insecure) == (protocol, target, insecure)
    assert config.service_name == "scalellm-gateway"


@pytest.mark.parametrize("endpoint", ["ftp://collector:21", "collector", "grpc://collector/v1/traces", "host:port"])
def test_bad_endpoints_are_refused_with_the_forms(endpoint):
    with pytest.raises(ValueError, match="OTLP"):
        tracing_config(endpoint, "scalellm-gateway", environ={})


def test_the_standard_variables_turn_tracing_on_and_off():
    assert tracing_config(None, "s", environ={}) is None
    config = tracing_config(None, "s", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert (config.protocol, config.endpoint) == (HTTP, "http://collector:4318/v1/traces")
    config = tracing_config(None, "s", environ={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"})
    assert config.endpoint == "http://c:4318/custom"
    config = tracing_config(None, "s", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                                                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert (config.protocol, config.endpoint) == (GRPC, "collector:4317")
    assert tracing_config(None, "s", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                              "OTEL_SDK_DISABLED": "true"}) is None
    # The flag wins over the variables.
    assert tracing_config("grpc://flag:4317", "s", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}).endpoint \
        == "flag:4317"


def test_gateway_and_replica_configs_check_the_endpoint():
    from scalellm.gateway.config import GatewayConfig
    from scalellm.replica.config import ReplicaConfig

    with pytest.raises(ValueError, match="OTLP"):
        GatewayConfig(replica_addresses=("127.0.0.1:1",), otlp_traces_endpoint="ftp://x")
    with pytest.raises(ValueError, match="OTLP"):
        ReplicaConfig(otlp_traces_endpoint="nowhere")


def _tracing(exporter):
    from scalellm.tracing.config import TracingConfig
    from scalellm.tracing.provider import Tracing

    return Tracing(TracingConfig("http://127.0.0.1:9/v1/traces", HTTP, "test"), exporter=exporter)


def test_spans_the_collector_refuses_are_counted_as_dropped():
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Refusing(SpanExporter):
        def export(self, spans):
            return SpanExportResult.FAILURE

    tracing = _tracing(Refusing())
    dropped = []
    tracing.on_dropped = dropped.append
    root = tracing.start("root", 1.0)
    tracing.span("child", root, 1.0, 2.0)
    tracing.end(root, 3.0)
    tracing.shutdown()  # exports what is queued
    assert tracing.num_dropped == 2 and sum(dropped) == 2


def test_spans_a_full_queue_turns_away_are_counted_as_dropped(monkeypatch):
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Stuck(SpanExporter):
        """A collector that hangs until released."""

        def __init__(self) -> None:
            self.release = threading.Event()

        def export(self, spans):
            self.release.wait(10)
            return SpanExportResult.SUCCESS

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    exporter = Stuck()
    tracing = _tracing(exporter)
    for i in range(20):
        tracing.end(tracing.start(f"span {i}", 1.0), 2.0)
    # At most one batch is with the stuck exporter and one queue's worth waits: the rest are dropped.
    assert 20 - 4 - 4 <= tracing.num_dropped <= 20 - 4
    exporter.release.set()
    tracing.shutdown()


def test_a_malformed_traceparent_is_no_parent_and_a_valid_one_is():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing = _tracing(exporter)
    for bad in ("", "garbage", "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033-01", "zz-0af7651916cd43dd8448eb211c80319c"):
        assert tracing.extract({"traceparent": bad}) is None, bad
    parent = tracing.extract({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    span = tracing.start("child", 1.0, parent)
    carrier = tracing.inject(span)
    tracing.end(span, 2.0)
    tracing.shutdown()
    (finished,) = exporter.get_finished_spans()
    assert format(finished.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(finished.parent.span_id, "016x") == "b7ad6b7169203331"
    assert carrier["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert (finished.start_time, finished.end_time) == (1_000_000_000, 2_000_000_000)


def test_tracing_off_imports_no_opentelemetry():
    code = ("import sys; import scalellm.gateway.app, scalellm.gateway.serving, scalellm.rpc.server, "
            "scalellm.replica.launch, scalellm.engine.scheduler;"
            "from scalellm.gateway.app import GatewayApp; from scalellm.gateway.config import GatewayConfig;"
            "app = GatewayApp(GatewayConfig(replica_addresses=('127.0.0.1:1',)), clients=[type('C', (), {'address': '127.0.0.1:1'})()]);"
            "assert app.service.tracing is None;"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_replica_reports_its_dropped_spans_through_load_to_the_gateway_metrics():
    import asyncio

    from scalellm.gateway.metrics import GatewayMetrics
    from scalellm.protocol.types import EngineLoad
    from scalellm.rpc import convert
    from scalellm.rpc.server import ReplicaService

    class Engine:
        def load(self) -> EngineLoad:
            return EngineLoad(num_running=1, num_waiting=0, num_free_blocks=8, num_total_blocks=10,
                              num_tokens_in_flight=3)

    class LossyTracing:
        num_dropped = 7

    load = convert.decode_load(asyncio.run(ReplicaService(Engine(), LossyTracing()).load(None, None)))
    assert load.num_spans_dropped == 7
    assert convert.decode_load(asyncio.run(ReplicaService(Engine()).load(None, None))).num_spans_dropped == 0
    metrics = GatewayMetrics()
    metrics.observe_replica_load("127.0.0.1:5", load)
    assert 'scalellm:replica_tracing_spans_dropped_total{replica="127.0.0.1:5"} 7.0' in metrics.render().decode()
