"""Failover that loses no token, in process: a replica that fails after some output is left for another
that resumes after the delivered tokens. Fake replicas make the failure points exact (mid-stream,
after the last token but before the finish, a resume that fails too); the mock-engine cluster runs
the real gRPC path and engine, with a replica stopped under a live stream."""

from __future__ import annotations

import asyncio
import http.client
import time

import orjson
import pytest
from gateway_fakes import FAKE_MODEL, GatewayThread, MockCluster

from scalellm.gateway.config import GatewayConfig
from scalellm.protocol.types import CompletionOutput, EngineHealth, EngineLoad, RequestOutput
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable

COMPLETIONS = "/v1/completions"


class FailingReplica:
    """Streams " w<k>" for output position k (token id 100 + k), one per chunk; fails with a 503 once
    it has sent `fail_after` chunks, before that chunk's finish if `lose_finish`. Honours
    resume_token_ids by continuing at their count, as a replica does."""

    def __init__(self, address: str, fail_after: int | None = None, lose_finish: bool = False) -> None:
        self.address = address
        self.fail_after, self.lose_finish = fail_after, lose_finish
        self.resumed_with: list[list[int]] = []

    async def generate(self, request_id, prompt, params, gateway_receive_time, timeout_s=None,
                       resume_token_ids=(), final_only=False):
        self.resumed_with.append(list(resume_token_ids))
        start = len(resume_token_ids)
        for sent, position in enumerate(range(start, params.max_tokens)):
            await asyncio.sleep(0.001)
            last = position == params.max_tokens - 1
            if self.fail_after is not None and sent == self.fail_after:
                raise ReplicaError(f"replica {self.address} ended the session", 503)
            finish = "length" if last and not (self.lose_finish and sent + 1 == self.fail_after) else None
            yield RequestOutput(request_id, [CompletionOutput(0, f" w{position}", [100 + position],
                                                              finish_reason=finish)],
                                finished=finish is not None, num_prompt_tokens=7)

    async def health(self, timeout_s: float = 1.0) -> EngineHealth:
        return EngineHealth(True)

    async def load(self, timeout_s: float = 1.0) -> EngineLoad:
        return EngineLoad(0, 0, 90, 100, 0)

    async def info(self, timeout_s: float = 2.0) -> tuple[str, int, str]:
        return FAKE_MODEL, 64, "fake"

    async def close(self) -> None:
        pass


def post(port: int, body: dict, path: str = COMPLETIONS) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, body=orjson.dumps(body))
    response = conn.getresponse()
    return response.status, response.read()


def stream_events(raw: bytes) -> list:
    lines = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]" or b"error" in lines[-1], lines[-1]
    return [orjson.loads(line) for line in lines if line != b"[DONE]"]


def gateway(replicas) -> GatewayThread:
    config = GatewayConfig(replica_addresses=tuple(r.address for r in replicas), port=0,
                           routing_policy="round_robin", health_interval_s=60)
    return GatewayThread(config, replicas)


EXPECTED = "".join(f" w{k}" for k in range(6))


@pytest.mark.parametrize("stream", [True, False])
def test_a_replica_failing_mid_stream_is_resumed_on_another(stream):
    first, second = FailingReplica("a:1", fail_after=2), FailingReplica("b:2")
    with gateway([first, second]) as gw:
        status, raw = post(gw.app.port, {"prompt": "hi", "max_tokens": 6, "stream": stream,
                                         "stream_options": {"include_usage": True}} if stream else
                           {"prompt": "hi", "max_tokens": 6})
    assert status == 200
    if stream:
        events = stream_events(raw)
        text = "".join(choice["text"] for e in events for choice in e["choices"])
        usage, finish = events[-1]["usage"], [c["finish_reason"] for e in events for c in e["choices"]][-1]
    else:
        body = orjson.loads(raw)
        text, usage, finish = body["choices"][0]["text"], body["usage"], body["choices"][0]["finish_reason"]
    assert text == EXPECTED and finish == "length"
    assert usage["prompt_tokens"] == 7 and usage["completion_tokens"] == 6
    assert second.resumed_with == [[100, 101]]  # the delivered token ids, once


def test_finish_lost_after_the_last_token_ends_the_stream_without_a_resume():
    first, second = FailingReplica("a:1", fail_after=6, lose_finish=True), FailingReplica("b:2")
    with gateway([first, second]) as gw:
        status, raw = post(gw.app.port, {"prompt": "hi", "max_tokens": 6, "stream": True})
    events = stream_events(raw)
    assert status == 200 and "".join(c["text"] for e in events for c in e["choices"]) == EXPECTED
    assert events[-1]["choices"][0]["finish_reason"] == "length" and second.resumed_with == []


def test_a_resume_that_fails_too_moves_on_then_ends_with_an_error_event():
    replicas = [FailingReplica("a:1", fail_after=1), FailingReplica("b:2", fail_after=2),
                FailingReplica("c:3", fail_after=1)]
    with gateway(replicas) as gw:
        started = time.monotonic()
        status, raw = post(gw.app.port, {"prompt": "hi", "max_tokens": 6, "stream": True})
        assert time.monotonic() - started < 5  # never a hang
        events = stream_events(raw)
        assert "".join(c["text"] for e in events if "choices" in e for c in e["choices"]) == " w0 w1 w2 w3"
        assert "error" in events[-1] and "no healthy replica" in events[-1]["error"]["message"]
        assert [r.resumed_with for r in replicas] == [[[]], [[100]], [[100, 101, 102]]]
        assert gw.call(lambda: [s.num_requests_in_flight for s in gw.app.router.replicas]) == [0, 0, 0]


def test_mock_cluster_replica_stopped_under_a_stream_is_resumed():
    cluster = MockCluster(num_replicas=2, tpot_ms=20.0, max_model_len=128)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", cluster.app.port, timeout=10)
        body = {"prompt": "a b c", "max_tokens": 30, "stream": True, "stop": ["tok7 tok8 tok99"],
                "stream_options": {"include_usage": True}}
        conn.request("POST", COMPLETIONS, body=orjson.dumps(body))
        response = conn.getresponse()
        received = b""
        while received.count(b"data: ") < 8:  # tok7 is held back as a possible stop string
            received += response.read1(65536)
        serving = next(i for i, engine in enumerate(cluster.engines) if engine.load().num_running)
        cluster.run(cluster.servers[serving].stop(0))
        received += response.read()
        events = stream_events(received)
        text = "".join(c["text"] for e in events for c in e["choices"])
        assert text == " ".join(f"tok{k}" for k in range(30))
        assert events[-1]["usage"]["completion_tokens"] == 30 and events[-1]["usage"]["prompt_tokens"] == 3
    finally:
        cluster.close()


@pytest.mark.parametrize("grace_s", [0.3, 5.0])
def test_a_stopping_replica_hands_queued_requests_over_at_once_and_running_ones_after_its_grace(grace_s):
    """60 tokens take 1.2 s: with a short grace the running request moves after it, with a long one it
    finishes where it is; either way the queued request moves at once, so the stop takes < 2 s (it
    would take 2.4 s if the queued request waited its turn)."""
    cluster = MockCluster(num_replicas=2, tpot_ms=20.0, max_model_len=128, engine_options={"max_num_seqs": 1},
                          routing_policy="round_robin")
    try:
        conns = [http.client.HTTPConnection("127.0.0.1", cluster.app.port, timeout=10) for _ in range(3)]
        for conn in conns:  # a replica runs one and queues another (one sequence at a time)
            conn.request("POST", COMPLETIONS, body=orjson.dumps({"prompt": "a b", "max_tokens": 60, "stream": True}))
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        while not any(engine.load().num_waiting for engine in cluster.engines):
            assert time.monotonic() < deadline, [engine.load() for engine in cluster.engines]
            time.sleep(0.01)
        victim = next(i for i, engine in enumerate(cluster.engines) if engine.load().num_waiting)
        assert cluster.engines[victim].load().num_running == 1
        started = time.monotonic()
        cluster.run(cluster.servers[victim].stop(grace_s))
        assert time.monotonic() - started < 2.0
        for conn in conns:
            events = stream_events(conn.getresponse().read())
            assert "".join(c["text"] for e in events for c in e["choices"]) == " ".join(f"tok{k}" for k in range(60))
    finally:
        cluster.close()
