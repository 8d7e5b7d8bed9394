"""The gateway over real gRPC replicas running the mock engine (in-process servers, real sockets)."""

import socket
import time

import openai
import pytest

from gateway_fakes import MockCluster

pytestmark = pytest.mark.timeout(60)
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def cluster():
    cluster = MockCluster(num_replicas=2, tpot_ms=1.0, max_model_len=64, health_interval_s=0.2,
                          routing_policy="round_robin")
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.app.port}/v1", api_key="x", max_retries=0)


def test_model_learned_from_replicas(client):
    assert [m.id for m in client.models.list().data] == ["mock-model"]


def test_streamed_chat_with_usage_over_grpc(client):
    chunks = list(client.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 4  # <user> hello there <assistant>


def test_chat_n2_stop_logprobs_over_grpc(client):
    response = client.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=8, n=2,
                                              stop=[" tok3"], logprobs=True, top_logprobs=1)
    assert [c.message.content for c in response.choices] == ["tok0 tok1 tok2"] * 2
    assert [c.finish_reason for c in response.choices] == ["stop", "stop"]
    assert response.choices[0].logprobs.content[0].logprob == -0.5


def test_completion_prompt_too_long_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="mock-model", prompt="word " * 100, max_tokens=2)
    assert client.completions.create(model="mock-model", prompt="short", max_tokens=2).choices[0].text


def test_disconnect_mid_stream_aborts_in_the_engine(cluster):
    body = b'{"prompt": "x", "max_tokens": 60, "stream": true}'
    sock = socket.create_connection(("127.0.0.1", cluster.app.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
    assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    sock.close()
    deadline = time.monotonic() + 5
    while any(e.load().num_running for e in cluster.engines) or \
            any(s.load_tokens for s in cluster.app.router.replicas):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_stopped_replica_fails_over(cluster, client):
    cluster.run(cluster.servers[0].stop(0))
    for _ in range(4):
        response = client.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=2)
        assert response.choices[0].message.content == "tok0 tok1"
