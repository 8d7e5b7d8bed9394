"""The OpenAI API through the official client, against an in-process gateway with fake replicas."""

import asyncio
import http.client
import time

import openai
import orjson
import pytest
from gateway_fakes import FAKE_MODEL, FakeReplica, GatewayThread

from scalellm.gateway.config import GatewayConfig
from scalellm.rpc.client import ReplicaUnavailable

MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gateway():
    config = GatewayConfig(replica_addresses=("a:1", "b:2"), port=0, served_model_name=FAKE_MODEL)
    with GatewayThread(config, [FakeReplica("a:1"), FakeReplica("b:2")]) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


def test_chat_non_streamed_n2(client):
    response = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, n=2, max_tokens=3)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert [c.message.content for c in response.choices] == [" w0 w1 w2"] * 2
    assert [c.finish_reason for c in response.choices] == ["length", "length"]
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (7, 6, 13)


def test_chat_streamed_with_usage(client):
    chunks = list(client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " w0 w1 w2 w3"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


def test_chat_stop_and_logprobs(client):
    response = client.chat.completions.create(model=FAKE_MODEL, messages=MESSAGES, stop=["w2"],
                                              logprobs=True, top_logprobs=2)
    choice = response.choices[0]
    assert choice.message.content == " w0 w1" and choice.finish_reason == "stop"
    first = choice.logprobs.content[0]
    assert first.token == " w0" and first.logprob == -0.5 and first.bytes == list(b" w0")
    assert [t.token for t in first.top_logprobs] == [" w0", " alt2"]


def test_completions_streamed_and_not(client):
    response = client.completions.create(model=FAKE_MODEL, prompt="say", max_tokens=2, logprobs=1)
    assert response.id.startswith("cmpl-") and response.choices[0].text == " w0 w1"
    assert response.choices[0].logprobs.text_offset == [0, 3]
    chunks = list(client.completions.create(model=FAKE_MODEL, prompt="say", max_tokens=2, stream=True, n=2))
    assert sorted("".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)) == \
        [" w0 w1", " w0 w1"]


def test_models_health_metrics(gateway, client):
    assert [m.id for m in client.models.list().data] == [FAKE_MODEL]
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.port, timeout=5)
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and orjson.loads(response.read())["healthy_replicas"] == 2
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    for name in ("scalellm:gateway_requests_total", "scalellm:time_to_first_token_seconds_bucket",
                 "scalellm:e2e_request_latency_seconds", "scalellm:generation_tokens_total",
                 "scalellm:gateway_replica_dispatched_total", "scalellm:kv_cache_usage_perc"):
        assert name in text, name


def test_the_first_request_finds_the_model_listed():
    """The gateway probes its replicas once before it listens: the first /v1/models lists the model
    even when the replica takes a while to say what it serves."""
    class SlowInfo(FakeReplica):
        async def info(self, timeout_s=2.0):
            await asyncio.sleep(0.3)
            return await super().info(timeout_s)

    with GatewayThread(GatewayConfig(port=0), [SlowInfo("r0")]) as gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.app.port, timeout=5)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        assert response.status == 200
        assert [m["id"] for m in orjson.loads(response.read())["data"]] == [FAKE_MODEL]


def test_health_waits_for_the_model_name():
    """/health says ready only once /v1/models can list the model: a client (a load balancer, the
    bench) that saw 200 may ask for it at once. Here the replica cannot say what it serves at the
    gateway's first probe, only at a later one."""
    class LateInfo(FakeReplica):
        num_calls = 0

        async def info(self, timeout_s=2.0):
            self.num_calls += 1
            if self.num_calls == 1:
                raise ReplicaUnavailable("not yet")
            return await super().info(timeout_s)

    with GatewayThread(GatewayConfig(port=0, health_interval_s=0.5), [LateInfo("r0")]) as gw:
        conn = http.client.HTTPConnection("127.0.0.1", gw.app.port, timeout=5)
        statuses = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not statuses or statuses[-1] != 200):
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            if statuses[-1] == 200:
                conn.request("GET", "/v1/models")
                models = orjson.loads(conn.getresponse().read())["data"]
            time.sleep(0.05)
        assert statuses[0] == 503 and statuses[-1] == 200
        assert [m["id"] for m in models] == [FAKE_MODEL]


def test_keep_alive_serves_many_requests_on_one_connection(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.port, timeout=5)
    body = orjson.dumps({"model": FAKE_MODEL, "messages": MESSAGES, "max_tokens": 1})
    for _ in range(3):
        conn.request("POST", "/v1/chat/completions", body=body)
        response = conn.getresponse()
        assert response.status == 200 and orjson.loads(response.read())["choices"][0]["message"]["content"] == " w0"
