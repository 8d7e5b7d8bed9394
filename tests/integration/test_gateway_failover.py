"""Failover, health, client disconnects and draining, against an in-process gateway with fake replicas."""

import asyncio
import http.client
import socket
import threading
import time

import orjson
from gateway_fakes import FAKE_MODEL, FakeReplica, GatewayThread

from scalellm.gateway.config import GatewayConfig

CHAT = "/v1/chat/completions"
BODY = orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def post(port, body=BODY, path=CHAT):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("POST", path, body=body)
    response = conn.getresponse()
    return response.status, response.read()


def wait_for(condition, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_refusing_replica_fails_over_to_the_other():
    down, up = FakeReplica("down:1", unavailable=True), FakeReplica("up:2")
    config = GatewayConfig(replica_addresses=("down:1", "up:2"), port=0, routing_policy="round_robin",
                           health_interval_s=60)
    with GatewayThread(config, [down, up]) as gw:
        gw.app.router.replicas[0].probe_healthy = True  # the probe saw it down; pretend it has not yet
        assert [post(gw.app.port)[0] for _ in range(4)] == [200] * 4
        assert up.num_served == 4
        assert gw.call(lambda: [s.load_tokens for s in gw.app.router.replicas]) == [0, 0]


def test_all_replicas_down_is_a_fast_503():
    replicas = [FakeReplica("a:1", unavailable=True), FakeReplica("b:2", unavailable=True)]
    config = GatewayConfig(replica_addresses=("a:1", "b:2"), port=0, health_interval_s=0.05,
                           breaker_cooldown_s=0.1)
    with GatewayThread(config, replicas) as gw:
        wait_for(lambda: not gw.app.router.any_healthy())
        started = time.monotonic()
        status, body = post(gw.app.port)
        assert status == 503 and time.monotonic() - started < 0.5
        assert "no healthy replica" in orjson.loads(body)["error"]["message"]
        conn = http.client.HTTPConnection("127.0.0.1", gw.app.port, timeout=5)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 503
        for replica in replicas:
            replica.unavailable = False
        wait_for(gw.app.router.any_healthy)  # back once the breaker's cool-down has passed
        assert post(gw.app.port)[0] == 200


def test_client_disconnect_mid_stream_releases_everything():
    replica = FakeReplica("a:1", num_chunks=200, delay_s=0.01, max_model_len=4096)
    config = GatewayConfig(replica_addresses=("a:1",), port=0)
    with GatewayThread(config, [replica]) as gw:
        body = orjson.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True})
        sock = socket.create_connection(("127.0.0.1", gw.app.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b"
                     % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        assert gw.call(lambda: gw.app.router.replicas[0].load_tokens) > 0
        sock.close()
        wait_for(lambda: replica.num_closed_early == 1)
        state = gw.app.router.replicas[0]
        assert gw.call(lambda: (state.load_tokens, state.num_requests_in_flight,
                                gw.app.service.gate.num_in_flight)) == (0, 0, 0)
        assert post(gw.app.port)[0] == 200


def test_drain_finishes_in_flight_and_refuses_new():
    replica = FakeReplica("a:1", num_chunks=20, delay_s=0.01)
    config = GatewayConfig(replica_addresses=("a:1",), port=0, drain_timeout_s=5)
    gw = GatewayThread(config, [replica]).__enter__()
    results = []
    slow = threading.Thread(target=lambda: results.append(post(gw.app.port, orjson.dumps(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20}))))
    slow.start()
    wait_for(lambda: gw.app.service.gate.num_in_flight == 1)
    shutdown = asyncio.run_coroutine_threadsafe(gw.app.shutdown(), gw.loop)
    wait_for(lambda: gw.app.service.draining)
    status, body = post(gw.app.port)
    assert status == 503 and orjson.loads(body)["error"]["code"] == "draining"
    shutdown.result(5)
    slow.join(5)
    assert results[0][0] == 200
    gw.loop.call_soon_threadsafe(gw.loop.stop)
