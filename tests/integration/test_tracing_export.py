"""Export from an in-process gateway: to an OTLP/gRPC collector (a real one, decoding opentelemetry-proto),
and to an endpoint nobody listens on, where requests are served as fast as without tracing and the
spans that could not be delivered are counted in scalellm:tracing_spans_dropped."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request

from concurrent import futures

import grpc
from gateway_fakes import MockCluster
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from scalellm.process import free_ports


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def dropped(base_url: str) -> float:
    found = re.search(r"^scalellm:tracing_spans_dropped_total (\S+)$", get(base_url + "/metrics").decode(), re.M)
    return float(found.group(1))


def test_an_unreachable_collector_never_slows_or_fails_a_request(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")  # give up on a batch after a second
    closed_port = free_ports(1)[0]
    cluster = MockCluster(otlp_traces_endpoint=f"http://127.0.0.1:{closed_port}/v1/traces")
    try:
        body = json.dumps({"model": "mock-model", "prompt": "hello there", "max_tokens": 3}).encode()
        for _ in range(5):
            start = time.monotonic()
            request = urllib.request.Request(cluster.base_url + "/v1/completions", body,
                                             {"content-type": "application/json",
                                              "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                assert json.loads(response.read())["usage"]["completion_tokens"] == 3
            assert time.monotonic() - start < 0.5  # the exporter's retries are on its own thread
        deadline = time.monotonic() + 10
        while dropped(cluster.base_url) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dropped(cluster.base_url) >= 6  # one batch at least: a root and its stage spans
    finally:
        start = time.monotonic()
        cluster.close()
        assert time.monotonic() - start < 8  # the last export is abandoned, not waited for


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector keeping (service.name, span name, trace id) of each span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(service, span.name, span.trace_id.hex()) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_reach_an_otlp_grpc_collector(monkeypatch, caplog):
    """The gateway's spans of one request reach the collector in the client's trace, and the request's
    access-log line names that trace."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    caplog.set_level(logging.INFO, logger="scalellm.gateway.access")
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    cluster = MockCluster(otlp_traces_endpoint=f"grpc://127.0.0.1:{port}")
    try:
        body = json.dumps({"model": "mock-model", "prompt": "hello", "max_tokens": 2}).encode()
        request = urllib.request.Request(cluster.base_url + "/v1/completions", body,
                                         {"content-type": "application/json",
                                          "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        deadline = time.monotonic() + 10
        while len(collector.spans) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cluster.close()
        server.stop(0)
    assert {name for _, name, _ in collector.spans} == {"POST /v1/completions", "admit", "parse", "route",
                                                         "wait_first_chunk", "stream"}
    assert {(service, trace) for service, _, trace in collector.spans} == \
        {("scalellm-gateway", "4bf92f3577b34da6a3ce929d0e0e4736")}
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "scalellm.gateway.access"]
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and line["status"] == 200
