"""An OTLP endpoint nobody listens on: requests are served as fast as without tracing, and the spans
that could not be delivered are counted in scalellm:tracing_spans_dropped."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from gateway_fakes import MockCluster

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
