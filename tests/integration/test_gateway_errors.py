"""Bad input, authentication and admission limits, over raw HTTP and the official client."""

import http.client
import threading

import openai
import orjson
import pytest
from gateway_fakes import FAKE_MODEL, FakeReplica, GatewayThread

from scalellm.gateway.config import GatewayConfig

CHAT = "/v1/chat/completions"
GOOD = orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


@pytest.fixture(scope="module")
def gateway():
    config = GatewayConfig(replica_addresses=("a:1",), port=0, max_body_bytes=4096)
    with GatewayThread(config, [FakeReplica("a:1", max_model_len=64)]) as gw:
        gw.call(lambda: None)
        yield gw


BAD = [
    ("POST", CHAT, b"{oops", 400),
    ("POST", CHAT, b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff"}]}', 400),
    ("POST", CHAT, orjson.dumps({"model": FAKE_MODEL, "messages": []}), 400),
    ("POST", CHAT, orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400),
    ("POST", CHAT, orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}], "n": 0}), 400),
    ("POST", CHAT, orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}],
                                 "temperature": -1}), 400),
    ("POST", CHAT, orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}],
                                 "max_tokens": 10**9}), 400),
    ("POST", "/v1/completions", orjson.dumps({"model": FAKE_MODEL, "prompt": "x" * 100}), 400),  # > context
    ("POST", CHAT, orjson.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}), 404),
    ("POST", "/v1/embeddings", GOOD, 404),
    ("GET", CHAT, None, 405),
    ("POST", CHAT, b"x" * 5000, 413),
]


@pytest.mark.parametrize("method,path,body,status", BAD)
def test_bad_input_gets_openai_error_then_good_request_works(gateway, method, path, body, status):
    got, headers, raw = request(gateway.app.port, method, path, body)
    assert got == status, raw
    error = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert request(gateway.app.port, "POST", CHAT, GOOD)[0] == 200


def test_body_over_limit_with_chunked_upload_is_413(gateway):
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.port, timeout=5)
    conn.request("POST", CHAT, body=iter([b"x" * 3000, b"y" * 3000]), encode_chunked=True)
    assert conn.getresponse().status == 413


def test_api_keys_401_and_health_without_key():
    config = GatewayConfig(replica_addresses=("a:1",), port=0, api_keys=("k-123",))
    with GatewayThread(config, [FakeReplica("a:1")]) as gw:
        bad = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=FAKE_MODEL, messages=[{"role": "user", "content": "x"}])
        assert request(gw.app.port, "POST", CHAT, GOOD)[0] == 401
        assert request(gw.app.port, "GET", "/v1/models")[0] == 401
        good = openai.OpenAI(base_url=gw.base_url + "/v1", api_key="k-123", max_retries=0)
        assert good.chat.completions.create(model=FAKE_MODEL, messages=[{"role": "user", "content": "x"}]).choices
        assert request(gw.app.port, "GET", "/health")[0] == 200
        assert request(gw.app.port, "GET", "/metrics")[0] == 401  # needs the metrics scope (test_auth_scopes.py)


def test_rate_limit_429_with_retry_after():
    config = GatewayConfig(replica_addresses=("a:1",), port=0, rate_limit_rpm=2)
    with GatewayThread(config, [FakeReplica("a:1")]) as gw:
        assert [request(gw.app.port, "POST", CHAT, GOOD)[0] for _ in range(2)] == [200, 200]
        status, headers, body = request(gw.app.port, "POST", CHAT, GOOD)
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"


def test_full_queue_is_a_fast_429():
    config = GatewayConfig(replica_addresses=("a:1",), port=0, max_queue=1)
    with GatewayThread(config, [FakeReplica("a:1", num_chunks=50, delay_s=0.02)]) as gw:
        slow = threading.Thread(target=request, args=(gw.app.port, "POST", CHAT,
                                                       orjson.dumps({"messages": [{"role": "user", "content": "x"}],
                                                                     "max_tokens": 50})))
        slow.start()
        while gw.call(lambda: gw.app.service.gate.num_in_flight) == 0:
            pass
        status, headers, body = request(gw.app.port, "POST", CHAT, GOOD)
        assert status == 429 and headers["retry-after"] == "1"
        assert orjson.loads(body)["error"]["code"] == "queue_full"
        slow.join(5)
        assert request(gw.app.port, "POST", CHAT, GOOD)[0] == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_gets_a_504_or_an_error_event_and_the_gateway_serves_on(stream):
    replica = FakeReplica("a:1", num_chunks=40, delay_s=0.05)  # 2 s of output against a 0.4 s deadline
    config = GatewayConfig(replica_addresses=("a:1",), port=0, request_timeout_s=0.4)
    slow = orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                         "stream": stream})
    with GatewayThread(config, [replica]) as gw:
        status, _, raw = request(gw.app.port, "POST", CHAT, slow)  # returns: the body ends, no hang
        if stream:  # the head had gone out: the stream ends with an error event, then [DONE]
            assert status == 200
            events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
            assert len(events) > 2 and events[-1] == b"[DONE]"
            error = orjson.loads(events[-2])["error"]
        else:
            assert status == 504
            error = orjson.loads(raw)["error"]
        assert error["code"] == "timeout" and "longer than 0.4 s" in error["message"]
        assert gw.call(lambda: (replica.num_active, replica.num_closed_early)) == (0, 1)  # aborted at the replica
        assert request(gw.app.port, "POST", CHAT, GOOD)[0] == 200
        assert gw.call(lambda: gw.app.service.gate.num_in_flight) == 0
        assert b'scalellm:gateway_requests_total{route="/v1/chat/completions",status="504"} 1.0' in \
            request(gw.app.port, "GET", "/metrics")[2]
