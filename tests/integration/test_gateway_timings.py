"""The non-standard scalellm_timings field: what the gateway sends, that the official openai client
still parses it, and that the benchmark's breakdown turns it into stages."""

import http.client

import openai
import orjson
import pytest
from gateway_fakes import FAKE_MODEL, FakeReplica, GatewayThread, MockCluster

from scalellm.bench.client import ClientConfig
from scalellm.gateway.config import GatewayConfig
from scalellm.bench.runner import BenchPlan, run_plan

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "hello there"}]
ORDER = ("gateway_receive", "routed", "replica_receive", "scheduled", "first_token", "last_token",
         "gateway_send")


@pytest.fixture(scope="module")
def cluster():
    cluster = MockCluster(num_replicas=1, tpot_ms=2.0, max_model_len=256, log_requests=False)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def assert_ordered(timings: dict) -> None:
    assert set(timings) == set(ORDER)
    values = [timings[key] for key in ORDER]
    assert all(v > 0 for v in values), timings
    assert values == sorted(values), timings


def test_openai_client_parses_the_usage_chunk_with_timings(client):
    chunks = list(client.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert_ordered(last.model_extra["scalellm_timings"])
    assert all("scalellm_timings" not in c.model_extra for c in chunks[:-1])


def test_openai_client_parses_a_body_with_timings(client):
    response = client.completions.create(model="mock-model", prompt="a b c", max_tokens=3)
    assert response.choices[0].text == "tok0 tok1 tok2" and response.usage.completion_tokens == 3
    assert_ordered(response.model_extra["scalellm_timings"])


def raw_stream(port: int, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", orjson.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return response.read()


def test_stream_without_usage_gets_no_extra_chunk(cluster):
    body = raw_stream(cluster.app.port, {"messages": MESSAGES, "max_tokens": 3, "stream": True})
    events = [line for line in body.split(b"\n\n") if line]
    assert b"scalellm_timings" not in body
    assert len(events) == 1 + 3 + 1  # role, three tokens, [DONE]
    assert events[-1] == b"data: [DONE]"


def test_timings_can_be_turned_off():
    config = GatewayConfig(replica_addresses=("a:1",), port=0, served_model_name=FAKE_MODEL,
                           report_timings=False, log_requests=False)
    with GatewayThread(config, [FakeReplica("a:1")]) as gateway:
        streamed = raw_stream(gateway.app.port, {"messages": MESSAGES, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        assert b'"usage":{' in streamed and b"scalellm_timings" not in streamed
        client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES)
        assert "scalellm_timings" not in (response.model_extra or {})


@pytest.mark.parametrize("stream", [True, False])
def test_bench_breakdown_over_the_gateway(cluster, stream):
    config = ClientConfig(base_url=cluster.base_url, model="mock-model", stream=stream, timeout_s=20)
    plan = BenchPlan(concurrencies=(2,), num_requests=6, num_warmup=1, input_len=8, output_len=4)
    [point] = run_plan("scalellm", config, plan)
    assert point.summary["failed"] == 0
    rows = {row["stage"]: row for row in point.summary["breakdown"]}
    for stage in ("client -> gateway", "gateway in", "transport", "pre-schedule", "prefill", "decode",
                  "gateway out", "to client"):
        assert rows[stage]["count"] == 6, stage
    assert rows["decode"]["median_ms"] > 0
    assert "tokenize" not in rows  # the replicas do not report "queued"
