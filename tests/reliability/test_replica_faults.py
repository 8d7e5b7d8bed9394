"""A replica killed (kill -9) or hung (SIGSTOP) under load, against `scalellm serve --engine mock`.

What must hold: non-streamed requests are retried elsewhere and none fails; streams already started
resume on the other replica (gateway/failover.py) and end with [DONE] and the end of the chunked
body, within a deadline;
new traffic avoids the replica; the replica comes back (restarted, or SIGCONT) and gets traffic again.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from procs import MOCK, Serve, chat_body, http, is_openai_error, metric, stream_events, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

HEALTH_INTERVAL_S, HEALTH_TIMEOUT_S, BREAKER_FAILURES = 0.5, 0.5, 3
DOWN_WITHIN_S = HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S
"""A hung replica leaves routing at its first failed probe."""
ABORT_WITHIN_S = BREAKER_FAILURES * (HEALTH_INTERVAL_S + HEALTH_TIMEOUT_S)
"""Requests waiting on it are aborted once its breaker opens on failed probes."""
SLACK_S = 3.0
"""Scheduling slack on a shared 2-core machine."""
STREAM_TOKENS, WHOLE_TOKENS, TPOT_MS = 150, 60, 20


def serve_two() -> Serve:
    return Serve(*MOCK, "--tpot-ms", str(TPOT_MS), "--replicas", "2", "--routing", "round_robin",
                 "--health-interval", str(HEALTH_INTERVAL_S), "--health-timeout", str(HEALTH_TIMEOUT_S),
                 "--breaker-failures", str(BREAKER_FAILURES), "--breaker-cooldown", "1")


def whole_request(port: int) -> tuple[int, bytes]:
    return http(port, "POST", "/v1/chat/completions", chat_body(WHOLE_TOKENS, False), timeout_s=30)


def check_whole(status: int, body: bytes) -> None:
    assert status == 200, body
    reply = orjson.loads(body)
    assert reply["usage"]["completion_tokens"] == WHOLE_TOKENS
    assert reply["choices"][0]["message"]["content"].split()[-1] == f"tok{WHOLE_TOKENS - 1}"


def check_stream(result: tuple[int, list[bytes], bool]) -> str:
    """'complete' or 'error'; fails for anything else (including a stream cut without an error event)."""
    status, events, clean = result
    assert status == 200 and clean, (status, events[-2:])
    assert events[-1] == b"[DONE]", events[-2:]
    last = events[-2]
    if b'"error"' in last:
        assert is_openai_error(last)
        return "error"
    assert orjson.loads(last)["choices"][0]["finish_reason"] == "length"
    return "complete"


def run_load(port: int, num_streams: int, num_whole: int, deadline_s: float, started: threading.Event):
    """Streams and non-streamed requests in parallel; `started` is set once every stream has an event."""
    first_events = threading.Semaphore(0)

    def one_stream():
        return stream_events(port, chat_body(STREAM_TOKENS, True), deadline_s,
                             on_event=lambda n: n == 2 and first_events.release())

    def wait_started():
        for _ in range(num_streams):
            first_events.acquire(timeout=deadline_s)
        started.set()

    pool = ThreadPoolExecutor(num_streams + num_whole + 1)
    streams = [pool.submit(one_stream) for _ in range(num_streams)]
    wholes = [pool.submit(whole_request, port) for _ in range(num_whole)]
    pool.submit(wait_started)
    return pool, streams, wholes


def dispatched(port: int, replica_port: str) -> float:
    return metric(port, "scalellm:gateway_replica_dispatched_total", f':{replica_port}"')


def healthy(port: int, replica_port: str) -> float:
    return metric(port, "scalellm:gateway_replica_healthy", f':{replica_port}"')


def test_kill_9_under_load_loses_no_request():
    serve = serve_two()
    try:
        replicas = serve.children("replica")
        victim_port, victim = sorted(replicas.items())[0]
        started = threading.Event()
        pool, streams, wholes = run_load(serve.port, 8, 16, 20.0, started)
        assert started.wait(15)
        victim.send_signal(signal.SIGKILL)
        outcomes = [check_stream(f.result(timeout=30)) for f in streams]
        for future in wholes:
            check_whole(*future.result(timeout=30))
        pool.shutdown()
        assert outcomes == ["complete"] * len(outcomes), outcomes  # streams resumed on the other replica
        # The supervisor restarts it; the gateway finds it again and routes to it.
        wait_until(lambda: (r := serve.children("replica").get(victim_port)) and r.pid != victim.pid
                   and healthy(serve.port, victim_port) == 1, 30, "restart")
        before = dispatched(serve.port, victim_port)
        for _ in range(4):
            check_whole(*whole_request(serve.port))
        assert dispatched(serve.port, victim_port) > before
    finally:
        serve.stop()


def test_sigstop_replica_is_avoided_nothing_hangs_and_sigcont_brings_it_back():
    serve = serve_two()
    try:
        hung_port, hung = sorted(serve.children("replica").items())[0]
        started = threading.Event()
        pool, streams, wholes = run_load(serve.port, 6, 8, 20.0, started)
        done_at = []
        for future in streams + wholes:
            future.add_done_callback(lambda _: done_at.append(time.monotonic()))
        assert started.wait(15)
        os.kill(hung.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            _, down_s = wait_until(lambda: healthy(serve.port, hung_port) == 0, DOWN_WITHIN_S + SLACK_S, "down")
            for _ in range(6):  # new traffic avoids it: every request served promptly
                start = time.monotonic()
                check_whole(*whole_request(serve.port))
                assert time.monotonic() - start < WHOLE_TOKENS * TPOT_MS / 1000 + SLACK_S
            outcomes = [check_stream(f.result(timeout=ABORT_WITHIN_S + 15)) for f in streams]
            for future in wholes:
                check_whole(*future.result(timeout=ABORT_WITHIN_S + 15))
            released_s = max(done_at) - stopped_at  # retried requests run again, streams resume
            assert outcomes == ["complete"] * len(outcomes), outcomes
            assert released_s < ABORT_WITHIN_S + max(WHOLE_TOKENS, STREAM_TOKENS) * TPOT_MS / 1000 + SLACK_S
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        pool.shutdown()
        _, back_s = wait_until(lambda: healthy(serve.port, hung_port) == 1, 1.0 + DOWN_WITHIN_S + SLACK_S, "back")
        before = dispatched(serve.port, hung_port)
        for _ in range(4):
            check_whole(*whole_request(serve.port))
        assert dispatched(serve.port, hung_port) > before
        print(f"SIGSTOP: out of routing after {down_s:.2f} s, requests released after {released_s:.2f} s, "
              f"back {back_s:.2f} s after SIGCONT")
    finally:
        serve.stop()
