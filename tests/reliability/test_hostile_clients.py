"""Hostile clients against a real gateway process: slowloris, a thousand idle connections, 10 MB bodies,
deeply nested JSON, very long stop lists, and more connections than allowed. Others keep being served."""

from __future__ import annotations

import resource
import socket
import threading
import time

import orjson
import pytest
from procs import MOCK, Serve, chat_body, http, is_openai_error, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HEADER_TIMEOUT_S, MAX_CONNECTIONS, NUM_IDLE = 2.0, 1400, 1000
PROMPT_S = 1.0
"""A normal request (4 tokens at 1 ms) must be answered within this while the attack goes on."""


@pytest.fixture(scope="module")
def serve():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 600
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    serve = Serve(*MOCK, "--tpot-ms", "1", "--replicas", "1", "--header-timeout", str(HEADER_TIMEOUT_S),
                  "--body-timeout", "3", "--keep-alive-timeout", "5", "--max-connections", str(MAX_CONNECTIONS))
    yield serve
    serve.stop()


def served_promptly(port: int) -> float:
    start = time.monotonic()
    status, body = http(port, "POST", "/v1/chat/completions", chat_body(4, False), timeout_s=10)
    elapsed = time.monotonic() - start
    assert status == 200 and orjson.loads(body)["usage"]["completion_tokens"] == 4
    assert elapsed < PROMPT_S, f"a normal request took {elapsed:.2f} s during the attack"
    return elapsed


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert is_openai_error(body), response[:300]
    return int(head.split()[1]), orjson.loads(body)["error"]


def test_slowloris_and_idle_connections_do_not_starve_others(serve):
    idle = [connect(serve.port) for _ in range(NUM_IDLE)]
    slow = [connect(serve.port) for _ in range(20)]
    stop = threading.Event()

    def drip():  # one header byte per connection every 0.2 s: never a whole head
        line = b"POST /v1/chat/completions HTTP/1.1\r\nx-slow: " + b"a" * 10_000
        for position in range(len(line)):
            if stop.is_set():
                return
            for sock in slow:
                try:
                    sock.send(line[position:position + 1])
                except OSError:
                    pass
            time.sleep(0.2)
    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        timings = [served_promptly(serve.port) for _ in range(10)]
        started = time.monotonic()
        answers = [read_all(sock, HEADER_TIMEOUT_S + 5) for sock in slow]  # 408, then closed
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 3
        for answer in answers:
            status, error = error_of(answer)
            assert status == 408 and "did not arrive" in error["message"]
        for sock in idle:  # never sent a byte: closed without an answer
            assert read_all(sock, HEADER_TIMEOUT_S + 5) == b""
        print(f"{NUM_IDLE} idle + 20 slowloris connections: normal requests in {max(timings) * 1000:.0f} ms at most")
    finally:
        stop.set()
        for sock in idle + slow:
            sock.close()
    served_promptly(serve.port)


def test_connections_beyond_the_cap_get_a_503(serve):
    held = [connect(serve.port) for _ in range(MAX_CONNECTIONS + 50)]
    try:
        refused = []
        for sock in held[-50:]:
            status, error = error_of(read_all(sock, 5))
            refused.append(status == 503 and "too many open connections" in error["message"])
        assert all(refused)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: http(serve.port, "GET", "/health")[0] == 200, 5, "accepting again")
    served_promptly(serve.port)


def test_huge_bodies_nested_json_and_long_stop_lists(serve):
    ten_mb = b"x" * (10 * 2**20)
    results = {}

    def upload(name, headers, chunks):
        sock = connect(serve.port)
        try:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + headers + b"\r\n")
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server may close before the upload ends
        results[name] = read_all(sock, 10)
        sock.close()
    uploads = [threading.Thread(target=upload, args=("declared", b"content-length: %d\r\n" % len(ten_mb),
                                                     [ten_mb])),
               threading.Thread(target=upload, args=("chunked", b"transfer-encoding: chunked\r\n",
                                                     [b"100000\r\n" + b"y" * 2**20 + b"\r\n"] * 10 + [b"0\r\n\r\n"]))]
    for thread in uploads:
        thread.start()
    served_promptly(serve.port)
    for thread in uploads:
        thread.join(20)
    for name in ("declared", "chunked"):
        assert error_of(results[name])[0] == 413
    nested = b'{"messages": ' + b"[" * 2_000_000 + b"]" * 2_000_000 + b"}"
    long_stop = orjson.dumps({"messages": [{"role": "user", "content": "x"}], "stop": ["s"] * 50_000})
    for body in (nested, long_stop):
        start = time.monotonic()
        status, raw = http(serve.port, "POST", "/v1/chat/completions", body, timeout_s=10)
        assert status == 400 and is_openai_error(raw) and time.monotonic() - start < 2
    served_promptly(serve.port)
