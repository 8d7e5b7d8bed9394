"""Replicas slow to start, all replicas down, the gateway restarted while replicas keep running, and
clients that disconnect at random points: real processes, deadlines on every wait."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from procs import (MOCK, Serve, chat_body, end, http, is_openai_error, metric, start_gateway, start_replica,
                   stream_events, wait_until)

from scalellm.process import free_ports
from scalellm.rpc.client import ReplicaClient

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAST_503_S = 1.0


def chat(port: int, max_tokens: int = 4, timeout_s: float = 10.0) -> tuple[int, bytes]:
    return http(port, "POST", "/v1/chat/completions", chat_body(max_tokens, False), timeout_s=timeout_s)


def replica_load(port: int):
    async def read():
        client = ReplicaClient(f"127.0.0.1:{port}")
        try:
            return await client.load(timeout_s=5)
        finally:
            await client.close()
    return asyncio.run(read())


def assert_fast_503(port: int) -> None:
    start = time.monotonic()
    status, body = chat(port)
    assert status == 503 and time.monotonic() - start < FAST_503_S
    assert is_openai_error(body) and "no healthy replica" in orjson.loads(body)["error"]["message"]


def test_replicas_slow_to_start_then_all_down():
    gateway_port, first_port, second_port = free_ports(3)
    gateway = start_gateway(gateway_port, [first_port, second_port], "--health-interval", "0.3",
                            "--breaker-cooldown", "0.5", "--routing", "round_robin")
    replicas = []
    try:
        # Until their health probes have failed, replicas count as routable (the 503 is then for the
        # unknown model): on a loaded machine that can outlast the gateway's first answers.
        def unhealthy():
            status, body = http(gateway_port, "GET", "/health")
            return orjson.loads(body) if status == 503 and orjson.loads(body)["healthy_replicas"] == 0 else None

        health, _ = wait_until(unhealthy, 30, "gateway up with its replicas marked down")
        assert health["status"] == "unavailable"
        for _ in range(3):  # no replica yet: a fast, clear 503, never a wait
            assert_fast_503(gateway_port)
        replicas.append(start_replica(first_port, "--tpot-ms", "1"))
        _, first_s = wait_until(lambda: chat(gateway_port)[0] == 200, 30, "first replica serving")
        for _ in range(10):  # one replica still starting: every request is served by the other
            assert chat(gateway_port)[0] == 200
        replicas.append(start_replica(second_port, "--tpot-ms", "1"))
        wait_until(lambda: orjson.loads(http(gateway_port, "GET", "/health")[1])["healthy_replicas"] == 2, 30,
                   "second replica healthy")
        before = metric(gateway_port, "scalellm:gateway_replica_dispatched_total", f':{second_port}"')
        for _ in range(4):
            assert chat(gateway_port)[0] == 200
        assert metric(gateway_port, "scalellm:gateway_replica_dispatched_total", f':{second_port}"') > before
        for replica in replicas:  # all down
            end(replica)
        for _ in range(5):
            assert_fast_503(gateway_port)
        wait_until(lambda: http(gateway_port, "GET", "/health")[0] == 503, 5, "health reports it")
    finally:
        for process in (gateway, *replicas):
            end(process)


def test_gateway_restarted_while_replicas_keep_running():
    serve = Serve(*MOCK, "--tpot-ms", "20", "--replicas", "2", "--health-interval", "0.3")
    try:
        replica_pids = {port: p.pid for port, p in serve.children("replica").items()}
        gateway = serve.children("gateway")["gateway"]
        streams = ThreadPoolExecutor(4)
        cut = [streams.submit(stream_events, serve.port, chat_body(500, True), 30) for _ in range(4)]
        wait_until(lambda: sum(replica_load(int(p)).num_running for p in replica_pids) == 4, 10, "streams running")
        gateway.send_signal(signal.SIGKILL)
        for future in cut:  # the client sees its connection end, never a hang
            status, events, clean = future.result(timeout=10)
            assert status == 200 and not clean
        streams.shutdown()
        _, restart_s = wait_until(lambda: chat(serve.port)[0] == 200, 30, "gateway restarted")
        assert serve.children("gateway")["gateway"].pid != gateway.pid
        assert {port: p.pid for port, p in serve.children("replica").items()} == replica_pids
        for port in replica_pids:  # the calls of the dead gateway were cancelled: nothing left running
            wait_until(lambda: replica_load(int(port)).num_running == 0, 10, "requests of the dead gateway ended")
        print(f"gateway restarted and serving after {restart_s:.2f} s")
    finally:
        serve.stop()


def _disconnect_somewhere(port: int, rng: random.Random) -> str:
    """One client that goes away at a random point of its request or response."""
    stream = rng.random() < 0.7
    body = chat_body(rng.randint(20, 200), stream, content=" ".join(["word"] * rng.randint(1, 50)))
    request = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    point = rng.choice(["head", "body", "sent", "events", "events", "events"])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)  # a loaded machine may be slow to answer
    try:
        if point == "head":
            sock.sendall(request[:rng.randint(1, request.index(b"\r\n\r\n"))])
        elif point == "body":
            sock.sendall(request[:rng.randint(request.index(b"\r\n\r\n") + 4, len(request) - 1)])
        else:
            sock.sendall(request)
            if point == "events" and stream:  # a stream of 20 tokens or more sends over 1,500 bytes
                received = 0
                wanted = rng.randint(1, 1500)
                while received < wanted and (data := sock.recv(wanted - received)):
                    received += len(data)
            else:
                time.sleep(rng.random() * 0.05)
        return point
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        sock.close()


@pytest.mark.parametrize("engine,num_clients", [("mock", 120), ("real", 16)])
def test_clients_disconnecting_at_random_points_leave_nothing_behind(engine, num_clients):
    """The mock engine counts KV blocks as the real one does; the real one (int8) frees its own."""
    flags = (*MOCK, "--tpot-ms", "5", "--replicas", "2") if engine == "mock" else (
        "--quantization", "int8", "--replicas", "1", "--kv-cache-gib", "0.25", "--no-request-log")
    serve = Serve(*flags, "--header-timeout", "2", "--body-timeout", "2", timeout_s=240)
    try:
        rng = random.Random(7)
        with ThreadPoolExecutor(16) as pool:
            points = list(pool.map(lambda seed: _disconnect_somewhere(serve.port, random.Random(seed)),
                                   [rng.random() for _ in range(num_clients)]))
        assert {"head", "body", "sent", "events"} <= set(points)
        ports = [int(p) for p in serve.children("replica")]

        def all_released():
            loads = [replica_load(p) for p in ports]
            return (metric(serve.port, "scalellm:gateway_requests_in_flight") == 0
                    and all(l.num_running == l.num_waiting == 0 and l.num_free_blocks == l.num_total_blocks
                            for l in loads))
        wait_until(all_released, 30, "every request and KV block released", interval_s=0.2)
        assert chat(serve.port)[0] == 200
    finally:
        serve.stop()
