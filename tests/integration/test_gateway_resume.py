"""Failover that loses no token, in process: a replica that fails after some output is left for another
that resumes after the delivered tokens. Fake replicas make the failure points exact (mid-stream,
after the last token but before the finish, a resume that fails too; n samples at different points,
one finished; each prompt of a completions request on its own); the mock-engine cluster runs the
real gRPC path and engine, with a replica stopped under a live stream and with resumed samples."""

from __future__ import annotations

import asyncio
import collections
import http.client
import time

import orjson
import pytest
from gateway_fakes import FAKE_MODEL, GatewayThread, MockCluster

from scalellm.gateway.config import GatewayConfig
from scalellm.protocol.types import (CompletionOutput, EngineHealth, EngineLoad, RequestOutput, ResumedSample,
                                     SamplingParams)
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable

COMPLETIONS = "/v1/completions"


class FailingReplica:
    """Streams output position k of sample i as the word " <prompt><k>" (" <prompt><k>/<i>" for i > 0),
    token id 100 + k, cumulative logprob -0.5 (k + 1); each chunk holds one position of every running
    sample. With `stagger`, sample i starts at chunk i (the samples' progress differs); `stop_after`
    ends sample i with "stop" after that many tokens. Fails with a 503 once it has sent `fail_after`
    chunks, having left out a finish due in the last of them if `lose_finish`. Honours
    resumed_samples as a replica does: only those run, each from its delivered count; and final_only:
    one output at the end, so that a failure reaches the gateway before any output, as unavailable
    (as the replica client reports a Session call that ended before the request's first output)."""

    def __init__(self, address: str, fail_after: int | None = None, lose_finish: bool = False,
                 stagger: bool = False, stop_after: dict[int, int] | None = None) -> None:
        self.address = address
        self.fail_after, self.lose_finish = fail_after, lose_finish
        self.stagger, self.stop_after = stagger, stop_after or {}
        self.resumed_with: list[list[tuple[int, list[int], float | None]]] = []

    async def generate(self, request_id, prompt, params, gateway_receive_time, timeout_s=None,
                       resumed_samples=(), final_only=False):
        self.resumed_with.append([(s.index, list(s.token_ids), s.cumulative_logprob) for s in resumed_samples])
        chunks = self._chunks(request_id, prompt, params, resumed_samples)
        if not final_only:
            async for output in chunks:
                yield output
            return
        folded: dict[int, CompletionOutput] = {}
        try:
            async for output in chunks:
                for sample in output.outputs:
                    into = folded.setdefault(sample.index, CompletionOutput(sample.index))
                    into.text += sample.text
                    into.token_ids += sample.token_ids
                    into.cumulative_logprob, into.finish_reason = sample.cumulative_logprob, sample.finish_reason
        except ReplicaError as error:
            raise ReplicaUnavailable(error.message) from None
        yield RequestOutput(request_id, [folded[i] for i in sorted(folded)], finished=output.finished,
                            num_prompt_tokens=7)

    async def _chunks(self, request_id, prompt, params, resumed_samples):
        if resumed_samples:
            positions = {s.index: len(s.token_ids) for s in resumed_samples}
        else:
            positions = {i: 0 for i in range(params.n)}
        first_chunk = {i: i if self.stagger and not resumed_samples else 0 for i in positions}
        lengths = {i: min(params.max_tokens, self.stop_after.get(i, params.max_tokens)) for i in positions}
        sent, lost = 0, False
        while positions:
            await asyncio.sleep(0.001)
            if self.fail_after is not None and sent == self.fail_after:
                raise ReplicaError(f"replica {self.address} ended the session", 503)
            outputs = []
            for i in [i for i in sorted(positions) if sent >= first_chunk[i]]:
                k = positions.pop(i)
                finish = None
                if k + 1 == lengths[i]:
                    lost = lost or (self.lose_finish and sent + 1 == self.fail_after)
                    finish = None if lost else "stop" if lengths[i] < params.max_tokens else "length"
                else:
                    positions[i] = k + 1
                word = f" {prompt}{k}" if i == 0 else f" {prompt}{k}/{i}"
                outputs.append(CompletionOutput(i, word, [100 + k], cumulative_logprob=-0.5 * (k + 1),
                                                finish_reason=finish))
            sent += 1
            yield RequestOutput(request_id, outputs, finished=not positions and not lost, num_prompt_tokens=7)

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
        status, raw = post(gw.app.port, {"prompt": "w", "max_tokens": 6, "stream": stream,
                                         "stream_options": {"include_usage": True}} if stream else
                           {"prompt": "w", "max_tokens": 6})
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
    # Streamed, the delivered token ids, once; not streamed, nothing was delivered: it runs again whole.
    assert second.resumed_with == ([[(0, [100, 101], -1.0)]] if stream else [[]])


def test_finish_lost_after_the_last_token_ends_the_stream_without_a_resume():
    first, second = FailingReplica("a:1", fail_after=6, lose_finish=True), FailingReplica("b:2")
    with gateway([first, second]) as gw:
        status, raw = post(gw.app.port, {"prompt": "w", "max_tokens": 6, "stream": True})
    events = stream_events(raw)
    assert status == 200 and "".join(c["text"] for e in events for c in e["choices"]) == EXPECTED
    assert events[-1]["choices"][0]["finish_reason"] == "length" and second.resumed_with == []


def test_a_resume_that_fails_too_moves_on_then_ends_with_an_error_event():
    replicas = [FailingReplica("a:1", fail_after=1), FailingReplica("b:2", fail_after=2),
                FailingReplica("c:3", fail_after=1)]
    with gateway(replicas) as gw:
        started = time.monotonic()
        status, raw = post(gw.app.port, {"prompt": "w", "max_tokens": 6, "stream": True})
        assert time.monotonic() - started < 5  # never a hang
        events = stream_events(raw)
        assert "".join(c["text"] for e in events if "choices" in e for c in e["choices"]) == " w0 w1 w2 w3"
        assert "error" in events[-1] and "no healthy replica" in events[-1]["error"]["message"]
        assert [r.resumed_with for r in replicas] == [[[]], [[(0, [100], -0.5)]], [[(0, [100, 101, 102], -1.5)]]]
        assert gw.call(lambda: [s.num_requests_in_flight for s in gw.app.router.replicas]) == [0, 0, 0]


def choices(status: int, raw: bytes, stream: bool) -> tuple[dict[int, str], dict[int, str], dict]:
    """A completions answer's text and finish reason per choice index, and its usage."""
    assert status == 200, raw
    if not stream:
        body = orjson.loads(raw)
        return ({c["index"]: c["text"] for c in body["choices"]},
                {c["index"]: c["finish_reason"] for c in body["choices"]}, body["usage"])
    events = stream_events(raw)
    assert not any("error" in e for e in events), events[-1]
    texts, finishes = collections.defaultdict(str), {}
    for choice in (c for e in events for c in e["choices"]):
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            assert choice["index"] not in finishes, choice  # one finish per choice
            finishes[choice["index"]] = choice["finish_reason"]
    return dict(texts), finishes, events[-1]["usage"]


def words(prompt: str, sample: int, num_tokens: int) -> str:
    """FailingReplica's text for a sample that ran uninterrupted."""
    return "".join(f" {prompt}{k}" if sample == 0 else f" {prompt}{k}/{sample}" for k in range(num_tokens))


@pytest.mark.parametrize("stream", [True, False])
def test_n_samples_resume_only_the_unfinished_each_after_its_own_tokens(stream):
    # Sample i starts at chunk i; sample 1 stops after 2 tokens (in chunk 3); the replica fails after
    # chunk 3, when samples 0 and 2 had 3 and 1 tokens delivered.
    first = FailingReplica("a:1", fail_after=3, stagger=True, stop_after={1: 2})
    second = FailingReplica("b:2", stop_after={1: 2})  # the same model: run whole, sample 1 stops too
    with gateway([first, second]) as gw:
        answer = post(gw.app.port, {"prompt": "w", "n": 3, "max_tokens": 6, "stream": stream,
                                    **({"stream_options": {"include_usage": True}} if stream else {})})
    texts, finishes, usage = choices(*answer, stream)
    assert texts == {0: words("w", 0, 6), 1: words("w", 1, 2), 2: words("w", 2, 6)}
    assert finishes == {0: "length", 1: "stop", 2: "length"}
    assert usage["prompt_tokens"] == 7 and usage["completion_tokens"] == 6 + 2 + 6
    assert second.resumed_with == ([[(0, [100, 101, 102], -1.5), (2, [100], -0.5)]] if stream else [[]])


def test_a_sample_whose_finish_alone_was_lost_is_finished_and_the_others_resume():
    first = FailingReplica("a:1", fail_after=6, lose_finish=True, stagger=True)  # sample 0 ends in chunk 6
    second = FailingReplica("b:2")
    with gateway([first, second]) as gw:
        answer = post(gw.app.port, {"prompt": "w", "n": 2, "max_tokens": 6, "stream": True,
                                    "stream_options": {"include_usage": True}})
    texts, finishes, usage = choices(*answer, True)
    assert texts == {0: words("w", 0, 6), 1: words("w", 1, 6)} and finishes == {0: "length", 1: "length"}
    assert usage["completion_tokens"] == 12
    assert second.resumed_with == [[(1, [100, 101, 102, 103, 104], -2.5)]]


@pytest.mark.parametrize("stream", [True, False])
def test_each_prompt_of_a_completions_request_resumes_on_its_own(stream):
    # One prompt per replica (round robin); the one on "a:1" fails after 2 chunks (its samples 2
    # and 1 tokens in) and resumes on one of the others, which go on serving their own prompt too.
    replicas = [FailingReplica("a:1", fail_after=2, stagger=True), FailingReplica("b:2"), FailingReplica("c:3")]
    with gateway(replicas) as gw:
        answer = post(gw.app.port, {"prompt": ["p", "q", "r"], "n": 2, "max_tokens": 6, "stream": stream,
                                    **({"stream_options": {"include_usage": True}} if stream else {})})
        assert gw.call(lambda: [s.num_requests_in_flight for s in gw.app.router.replicas]) == [0, 0, 0]
    texts, finishes, usage = choices(*answer, stream)
    assert texts == {2 * p + i: words(prompt, i, 6) for p, prompt in enumerate("pqr") for i in range(2)}
    assert finishes == dict.fromkeys(range(6), "length")
    assert usage["prompt_tokens"] == 3 * 7 and usage["completion_tokens"] == 6 * 6
    resumes = [r for replica in replicas[1:] for r in replica.resumed_with if r]
    if stream:
        assert replicas[0].resumed_with == [[]]
        assert resumes == [[(0, [100, 101], -1.0), (1, [100], -0.5)]]
    else:  # nothing reaches the gateway before the end: each prompt that failed on "a:1" ran again whole
        num_failed = len(replicas[0].resumed_with)
        assert num_failed >= 1 and resumes == []
        assert sum(len(replica.resumed_with) for replica in replicas) == 3 + num_failed


def test_a_prompt_with_no_replica_left_ends_the_merged_stream_with_an_error_event():
    replicas = [FailingReplica("a:1", fail_after=1), FailingReplica("b:2", fail_after=2)]
    with gateway(replicas) as gw:
        started = time.monotonic()
        status, raw = post(gw.app.port, {"prompt": ["p", "q"], "max_tokens": 6, "stream": True})
        assert time.monotonic() - started < 5  # never a hang
        events = stream_events(raw)
        assert status == 200 and "no healthy replica" in events[-1]["error"]["message"]
        assert gw.call(lambda: [s.num_requests_in_flight for s in gw.app.router.replicas]) == [0, 0]


def test_a_replica_runs_only_the_resumed_samples_and_rejects_bad_ones():
    """The real gRPC replica and engine: resumed samples keep their indices and continue their
    cumulative logprob (the mock's tokens have logprob -0.5); bad ones are a 400 with the reason."""
    cluster = MockCluster(num_replicas=1, tpot_ms=1.0, max_model_len=64)
    client = cluster.app.router.replicas[0].client
    params = SamplingParams(n=3, max_tokens=6, logprobs=0)

    async def run(samples: list[ResumedSample]) -> list[RequestOutput]:
        return [output async for output in client.generate("r", "a b", params, 0.0, resumed_samples=samples)]

    try:
        outputs = cluster.run(run([ResumedSample(2, (0,), -0.5), ResumedSample(0, (0, 1, 2), -1.5)]))
        samples = collections.defaultdict(list)
        for sample in (s for output in outputs for s in output.outputs):
            samples[sample.index].append(sample)
        assert sorted(samples) == [0, 2] and outputs[-1].finished
        assert [t for s in samples[0] for t in s.token_ids] == [3, 4, 5]
        assert [t for s in samples[2] for t in s.token_ids] == [1, 2, 3, 4, 5]
        assert "".join(s.text for s in samples[0]) == " tok3 tok4 tok5"
        assert samples[0][-1].cumulative_logprob == samples[2][-1].cumulative_logprob == -3.0
        bad = {"not a sample of this request": [ResumedSample(3, (1,))],
               "listed twice": [ResumedSample(0, (1,)), ResumedSample(0, (1,))],
               "token ids must be integers": [ResumedSample(1, (10**6,))],
               "nothing is left": [ResumedSample(1, (1, 2, 3, 4, 5, 6))]}
        for reason, samples in bad.items():
            with pytest.raises(ReplicaError, match=reason) as error:
                cluster.run(run(samples))
            assert error.value.status_code == 400
    finally:
        cluster.close()


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
