"""Failover that loses no token, with real processes: `scalellm serve --engine mock --replicas 3`, and
replicas killed with SIGKILL under 32 concurrent streams (half greedy, half seeded) and 16 non-streamed
requests. Every request must succeed with exactly the text and usage of a reference run without a
kill: streams resume on another replica after the delivered tokens, twice when a second replica dies,
and requests still in prefill (no output yet) run again elsewhere. The other request shapes too: a
chat with n = 2 samples and a completions request with 3 prompts, their replica killed mid-stream.

The mock engine's tokens depend only on the output position (fake_model.py), as greedy and seeded
sampling's do on the real engine (tests/engine/test_resume_engine.py checks that half)."""

from __future__ import annotations

import collections
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
from procs import MOCK, Serve, http, metric, stream_events, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

NUM_STREAMS, NUM_WHOLE, MAX_TOKENS, TPOT_MS, TTFT_MS = 32, 16, 80, 25, 400
DEADLINE_S = 30.0


def body(index: int, stream: bool) -> bytes:
    sampling = {"temperature": 0} if index % 2 == 0 else {"temperature": 1.0, "seed": 1000 + index}
    return orjson.dumps({"messages": [{"role": "user", "content": f"question {index}"}], "stream": stream,
                         "max_tokens": MAX_TOKENS - index, "stop": ["tok40 tok41 tok99"], **sampling,
                         **({"stream_options": {"include_usage": True}} if stream else {})})


def streamed(port: int, index: int, on_event=None) -> tuple[str, dict, str]:
    status, events, clean = stream_events(port, body(index, True), DEADLINE_S, on_event=on_event)
    assert status == 200 and clean and events[-1] == b"[DONE]", (index, events[-2:])
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks), (index, events[-2:])
    text = "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"])
    finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    return text, chunks[-1]["usage"], finish[-1]


def whole(port: int, index: int) -> tuple[str, dict, str]:
    status, raw = http(port, "POST", "/v1/chat/completions", body(index, False), timeout_s=DEADLINE_S)
    assert status == 200, (index, raw)
    reply = orjson.loads(raw)
    choice = reply["choices"][0]
    return choice["message"]["content"], reply["usage"], choice["finish_reason"]


def run_all(port: int, while_running=None) -> list[tuple[str, dict, str]]:
    """Every request's (text, usage, finish reason); `while_running(started)` runs beside them, with
    `started` set once every stream has its first token."""
    started, num_started, lock = threading.Event(), [0], threading.Lock()

    def on_event(n: int) -> None:
        if n == 2:
            with lock:
                num_started[0] += 1
                if num_started[0] == NUM_STREAMS:
                    started.set()

    with ThreadPoolExecutor(NUM_STREAMS + NUM_WHOLE + 1) as pool:
        side = pool.submit(while_running, started) if while_running else None
        streams = [pool.submit(streamed, port, i, on_event) for i in range(NUM_STREAMS)]
        wholes = [pool.submit(whole, port, NUM_STREAMS + i) for i in range(NUM_WHOLE)]
        results = [f.result(timeout=DEADLINE_S + 10) for f in streams + wholes]
        if side is not None:
            side.result(timeout=DEADLINE_S)
    return results


def test_replicas_killed_under_load_lose_no_token():
    serve = Serve(*MOCK, "--replicas", "3", "--tpot-ms", str(TPOT_MS), "--ttft-ms", str(TTFT_MS),
                  "--routing", "round_robin", "--health-interval", "0.5", "--health-timeout", "0.5", "--breaker-cooldown", "1")
    try:
        reference = run_all(serve.port)
        assert all(usage["completion_tokens"] == MAX_TOKENS - i for i, (_, usage, _) in enumerate(reference))
        assert reference[0][0].split()[-1] == f"tok{MAX_TOKENS - 1}" and reference[0][2] == "length"
        replicas = sorted(serve.children("replica").values(), key=lambda p: p.pid)

        def kill_mid_decode_twice(started: threading.Event) -> None:
            assert started.wait(DEADLINE_S)
            replicas[0].send_signal(signal.SIGKILL)
            time.sleep(0.4)  # the second dies while it serves resumed requests
            replicas[1].send_signal(signal.SIGKILL)

        assert run_all(serve.port, kill_mid_decode_twice) == reference

        wait_until(lambda: metric(serve.port, "scalellm:gateway_replica_healthy") == 3, 30, "replicas back")

        def kill_in_prefill(started: threading.Event) -> None:
            time.sleep(TTFT_MS / 1000 / 3)  # requests dispatched, their prefill step not done yet
            replicas[2].send_signal(signal.SIGKILL)

        assert run_all(serve.port, kill_in_prefill) == reference
    finally:
        serve.stop()


N_SAMPLES_CHAT = orjson.dumps({"messages": [{"role": "user", "content": "two answers"}], "n": 2, "stream": True,
                               "temperature": 1.0, "seed": 7, "max_tokens": 60, "stop": ["tok40 tok41 tok99"],
                               "stream_options": {"include_usage": True}})
THREE_PROMPTS = orjson.dumps({"prompt": ["one", "two three", "four five six"], "temperature": 0, "stream": True,
                              "max_tokens": 60, "stop": ["tok40 tok41 tok99"],
                              "stream_options": {"include_usage": True}})


def per_choice(port: int, path: str, body: bytes, started: threading.Event) -> tuple[dict, dict, dict]:
    """A streamed request's (text per choice index, finish reason per index, usage); `started` is set
    once a few of its events arrived."""
    status, events, clean = stream_events(port, body, DEADLINE_S, on_event=lambda n: n == 4 and started.set(),
                                          path=path)
    assert status == 200 and clean and events[-1] == b"[DONE]", (path, events[-2:])
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert not any("error" in chunk for chunk in chunks), (path, events[-2:])
    texts, finishes = collections.defaultdict(str), {}
    for choice in (c for chunk in chunks for c in chunk["choices"]):
        texts[choice["index"]] += choice.get("text") or choice.get("delta", {}).get("content") or ""
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    return dict(texts), finishes, chunks[-1]["usage"]


def test_n_samples_and_several_prompts_resume_after_a_kill_9():
    """The chat runs on one replica, the 3 prompts on both (round robin): killing the chat's replica
    resumes both of its samples and the prompts that were on it, each on the other replica."""
    serve = Serve(*MOCK, "--replicas", "2", "--tpot-ms", str(TPOT_MS), "--routing", "round_robin",
                  "--health-interval", "0.5", "--health-timeout", "0.5", "--breaker-cooldown", "1")
    try:
        replicas = serve.children("replica")

        def run_both(kill: bool) -> tuple:
            chat_started, prompts_started = threading.Event(), threading.Event()
            dispatched = {port: metric(serve.port, "scalellm:gateway_replica_dispatched_total", f':{port}"')
                          for port in replicas}
            with ThreadPoolExecutor(2) as pool:
                chat = pool.submit(per_choice, serve.port, "/v1/chat/completions", N_SAMPLES_CHAT, chat_started)
                assert chat_started.wait(DEADLINE_S)
                chat_replica = [port for port, count in dispatched.items() if metric(
                    serve.port, "scalellm:gateway_replica_dispatched_total", f':{port}"') > count]
                prompts = pool.submit(per_choice, serve.port, "/v1/completions", THREE_PROMPTS, prompts_started)
                assert prompts_started.wait(DEADLINE_S) and len(chat_replica) == 1
                if kill:
                    replicas[chat_replica[0]].send_signal(signal.SIGKILL)
                return chat.result(DEADLINE_S), prompts.result(DEADLINE_S)

        reference = run_both(kill=False)
        (chat_texts, chat_finishes, chat_usage), (texts, finishes, usage) = reference
        assert sorted(chat_texts) == [0, 1] and sorted(texts) == [0, 1, 2]
        assert chat_texts[1].split()[-1] == "tok59" and set(chat_finishes.values()) == {"length"}
        assert chat_usage["completion_tokens"] == 2 * 60 and usage["completion_tokens"] == 3 * 60
        assert run_both(kill=True) == reference  # text per choice, finish reasons and usage
    finally:
        serve.stop()
