"""Observability as deployed: `scalellm serve --engine mock` exporting OTLP traces to a real receiver,
and a real Prometheus scraping it while every panel of the Grafana dashboard is queried."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from otlp_receiver import OtlpReceiver
from test_serve_mock import start_serve, stop

from scalellm.process import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
GATEWAY, REPLICA = "scalellm-gateway", "scalellm-replica"
GATEWAY_STAGES = {"admit", "parse", "route", "wait_first_chunk", "stream"}
REPLICA_STAGES = {"tokenize", "queue", "prefill", "decode", "detokenize"}


@pytest.fixture(scope="module")
def traced():
    """(serve's port, the OTLP receiver) for two mock replicas exporting every span to the receiver."""
    receiver = OtlpReceiver()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export every 100 ms: the test waits less
        process, port, _ = start_serve("--replicas", "2", "--otlp-traces-endpoint", receiver.endpoint)
    try:
        yield port, receiver
    finally:
        stop(process)
        receiver.close()


def post(port: int, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def chat(max_tokens: int = 4, stream: bool = False) -> dict:
    return {"model": "mock", "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": max_tokens, "stream": stream}


def spans_of(receiver: OtlpReceiver, request_id: str):
    """The request's spans, once both roots and their stages arrived."""
    def complete(spans):
        trace_ids = {s.trace_id for s in spans if s.attributes.get("scalellm.request_id") == request_id}
        names = {s.name for s in spans if s.trace_id in trace_ids}
        return "replica.generate" in names and "POST /v1/chat/completions" in names and \
            GATEWAY_STAGES | REPLICA_STAGES <= names
    spans = receiver.wait_for(complete)
    trace_ids = {s.trace_id for s in spans if s.attributes.get("scalellm.request_id") == request_id}
    assert len(trace_ids) == 1, f"request {request_id} is in several traces: {trace_ids}"
    (trace_id,) = trace_ids
    return {s.name: s for s in spans if s.trace_id == trace_id}, trace_id


def test_one_request_is_one_trace_across_gateway_and_replica(traced):
    port, receiver = traced
    client_trace, client_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    status, body = post(port, chat(max_tokens=5), {"traceparent": f"00-{client_trace}-{client_span}-01"})
    assert status == 200, body
    reply = json.loads(body)
    spans, trace_id = spans_of(receiver, reply["id"])
    assert trace_id == client_trace
    root, replica = spans["POST /v1/chat/completions"], spans["replica.generate"]
    assert (root.service, replica.service) == (GATEWAY, REPLICA)
    assert root.parent_span_id == client_span and replica.parent_span_id == root.span_id
    for name in GATEWAY_STAGES:
        assert (spans[name].service, spans[name].parent_span_id) == (GATEWAY, root.span_id), name
    for name in REPLICA_STAGES:
        assert (spans[name].service, spans[name].parent_span_id) == (REPLICA, replica.span_id), name
    assert spans["prefill_chunk"].parent_span_id == spans["prefill"].span_id
    assert root.start_ns <= replica.start_ns <= replica.end_ns <= root.end_ns
    usage = reply["usage"]
    for span in (root, replica):
        attributes = span.attributes
        assert attributes["gen_ai.request.model"] == "mock"
        assert attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 5
        assert attributes["gen_ai.response.finish_reasons"] == [reply["choices"][0]["finish_reason"]]
        assert attributes["gen_ai.request.max_tokens"] == 5
        assert attributes["scalellm.request_id"] == reply["id"]
    assert root.attributes["http.response.status_code"] == 200


def test_a_malformed_traceparent_starts_a_new_trace(traced):
    port, receiver = traced
    malformed = "00-0af7651916cd43dd8448eb211c80319c-zzzz-01"
    status, body = post(port, chat(stream=True), {"traceparent": malformed})
    assert status == 200
    first_event = json.loads(body.split(b"\n\n")[0].removeprefix(b"data: "))
    spans, trace_id = spans_of(receiver, first_event["id"])
    root = spans["POST /v1/chat/completions"]
    assert trace_id != "0af7651916cd43dd8448eb211c80319c" and root.parent_span_id == ""
    assert spans["replica.generate"].parent_span_id == root.span_id


# -- Prometheus and the dashboard --------------------------------------------------------------------

def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of deploy/grafana/scalellm.json."""
    dashboard = json.loads((REPO / "deploy/grafana/scalellm.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", ())]


def start_prometheus(tmp_path: Path, gateway_port: int) -> tuple[subprocess.Popen, int]:
    """The deploy/prometheus config pointed at the gateway, scraping every second."""
    config = (REPO / "deploy/prometheus/prometheus.yml").read_text()
    assert "scrape_interval: 5s" in config and '"127.0.0.1:8000"' in config
    config = config.replace("interval: 5s", "interval: 1s").replace("127.0.0.1:8000", f"127.0.0.1:{gateway_port}")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_ports(1)[0]
    process = subprocess.Popen(
        ["/usr/bin/prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, port


def query(port: int, promql: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (OSError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def load(port: int, stop_event: threading.Event) -> None:
    """Streams and non-streams, and one refused request a round (the error panel has something to show)."""
    while not stop_event.is_set():
        post(port, chat(max_tokens=8))
        post(port, chat(max_tokens=8, stream=True))
        post(port, {"model": "mock", "messages": "not a list"})
        time.sleep(0.05)


@pytest.mark.skipif(not os.path.exists("/usr/bin/prometheus"),
                    reason="needs Debian's prometheus package (/usr/bin/prometheus; .ci/run installs it)")
def test_every_dashboard_panel_has_data_in_prometheus(traced, tmp_path):
    port, _ = traced
    prometheus, prometheus_port = start_prometheus(tmp_path, port)
    stop_load = threading.Event()
    loader = threading.Thread(target=load, args=(port, stop_load), daemon=True)
    loader.start()
    try:
        wait_until(lambda: query(prometheus_port, 'up{job="scalellm"} == 1'), 30, "the first scrape")
        # Rates need two scrapes with traffic between them: wait for four under load.
        wait_until(lambda: float(query(prometheus_port, 'count_over_time(up{job="scalellm"}[1m])')[0]["value"][1])
                   >= 4, 30, "four scrapes")
        stop_load.set()
        loader.join(30)
        empty = [(title, expr) for title, expr in dashboard_queries() if not query(prometheus_port, expr)]
        assert not empty, f"panels without data: {empty}"
    finally:
        stop_load.set()
        prometheus.terminate()
        prometheus.wait(10)
