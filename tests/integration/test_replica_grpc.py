"""A real grpc.aio replica server over the mock engine, called through the gateway's ReplicaClient."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from scalellm.gateway.replica_client import ReplicaClient, ReplicaError, ReplicaUnavailable
from scalellm.protocol.types import ChatPrompt, SamplingParams
from scalellm.replica.mock_engine import MockEngine
from scalellm.replica.server import ReplicaServer

pytestmark = pytest.mark.timeout(60)


def run_with_replica(scenario, **engine_kwargs):
    """Run `scenario(engine, client, server)` against a fresh mock replica on a free port."""
    async def main():
        engine = MockEngine(**{"tpot_ms": 1.0, "max_model_len": 64, **engine_kwargs})
        await engine.start()
        server = ReplicaServer(engine, "127.0.0.1", 0)
        await server.start()
        client = ReplicaClient(server.address)
        try:
            return await scenario(engine, client, server)
        finally:
            await client.close()
            await server.stop(0)
            await engine.shutdown()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


async def collect(stream):
    return [output async for output in stream]


async def wait_idle(engine, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while engine.load().num_running or engine.load().num_waiting:
        assert time.monotonic() < deadline, f"engine still busy: {engine.load()}"
        await asyncio.sleep(0.01)


def test_stream_text_prompt():
    async def scenario(engine, client, server):
        outputs = await collect(client.generate("r1", "hello there world", SamplingParams(max_tokens=5),
                                                gateway_receive_time=123.5))
        assert "".join(o.outputs[0].text for o in outputs) == "tok0 tok1 tok2 tok3 tok4"
        assert [t for o in outputs for t in o.outputs[0].token_ids] == [0, 1, 2, 3, 4]
        assert all(o.request_id == "r1" and o.num_prompt_tokens == 3 for o in outputs)
        last = outputs[-1]
        assert last.finished and last.outputs[0].finish_reason == "length"
        assert not any(o.finished for o in outputs[:-1])
        m = last.metrics
        assert m.gateway_receive_time == 123.5
        assert 0 < m.replica_receive_time <= m.scheduled_time <= m.first_token_time <= m.last_token_time
    run_with_replica(scenario)


def test_stream_chat_with_samples_logprobs_and_stop():
    async def scenario(engine, client, server):
        prompt = ChatPrompt([{"role": "user", "content": "say something"}])
        params = SamplingParams(n=2, max_tokens=10, logprobs=2, stop=["tok3"])
        outputs = await collect(client.generate("r2", prompt, params, 0.0))
        for index in (0, 1):
            samples = [c for o in outputs for c in o.outputs if c.index == index]
            assert "".join(c.text for c in samples) == "tok0 tok1 tok2 "
            assert samples[-1].finish_reason == "stop" and samples[-1].stop_reason == "tok3"
            positions = [p for c in samples for p in c.logprobs]
            assert len(positions) == 4 and all(len(p) == 3 for p in positions)
            assert positions[0][0].rank == 1 and positions[0][0].logprob == -0.5
    run_with_replica(scenario)


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("word " * 80, "context")])
def test_bad_input_is_a_400(prompt, message):
    async def scenario(engine, client, server):
        with pytest.raises(ReplicaError) as info:
            await collect(client.generate("bad", prompt, SamplingParams(), 0.0))
        assert not isinstance(info.value, ReplicaUnavailable)
        assert info.value.status_code == 400 and message in info.value.message
    run_with_replica(scenario)


def test_closing_the_stream_aborts_in_the_engine():
    async def scenario(engine, client, server):
        stream = client.generate("long", "x", SamplingParams(max_tokens=60), 0.0)
        await stream.__anext__()
        await stream.__anext__()
        assert engine.load().num_running == 1
        assert (await client.load()).num_running == 1
        await stream.aclose()
        await wait_idle(engine)
        assert (await client.load()).num_tokens_in_flight == 0
    run_with_replica(scenario, tpot_ms=20.0)


def test_cancelling_the_reader_task_aborts_in_the_engine():
    async def scenario(engine, client, server):
        started = asyncio.Event()

        async def read():
            async for _ in client.generate("long", "x", SamplingParams(max_tokens=60), 0.0):
                started.set()
        task = asyncio.create_task(read())
        await asyncio.wait_for(started.wait(), 2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_idle(engine)
    run_with_replica(scenario, tpot_ms=20.0)


def test_deadline_is_a_504_and_aborts():
    async def scenario(engine, client, server):
        with pytest.raises(ReplicaError) as info:
            await collect(client.generate("slow", "x", SamplingParams(max_tokens=60), 0.0, timeout_s=0.2))
        assert info.value.status_code == 504
        await wait_idle(engine)
    run_with_replica(scenario, tpot_ms=20.0)


def test_health_load_info():
    async def scenario(engine, client, server):
        assert (await client.health()).healthy
        assert await client.info() == ("mock", 64)
        load = await client.load()
        assert (load.num_running, load.num_waiting, load.num_tokens_in_flight) == (0, 0, 0)
        assert load.num_free_blocks == load.num_total_blocks > 0
        await engine.shutdown()
        health = await client.health()
        assert not health.healthy and "step loop" in health.detail
    run_with_replica(scenario)


def test_waiting_requests_are_reported():
    async def scenario(engine, client, server):
        streams = [client.generate(f"r{i}", "a b", SamplingParams(max_tokens=50), 0.0) for i in range(3)]
        tasks = [asyncio.create_task(collect(s)) for s in streams]
        await asyncio.sleep(0.1)
        load = await client.load()
        assert (load.num_running, load.num_waiting) == (1, 2)
        assert load.num_tokens_in_flight > 100
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_idle(engine)
    run_with_replica(scenario, tpot_ms=10.0, max_num_seqs=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_replica_is_unavailable():
    async def scenario():
        client = ReplicaClient(f"127.0.0.1:{_free_port()}")
        try:
            with pytest.raises(ReplicaUnavailable):
                await collect(client.generate("r", "x", SamplingParams(), 0.0))
            with pytest.raises(ReplicaUnavailable):
                await client.health()
        finally:
            await client.close()
    asyncio.run(scenario())


def test_client_reconnects_to_a_restarted_replica():
    async def scenario(engine, client, server):
        port = server.port
        await collect(client.generate("a", "x", SamplingParams(max_tokens=2), 0.0))
        await server.stop(0)
        with pytest.raises(ReplicaUnavailable):
            await client.health()
        restarted = ReplicaServer(engine, "127.0.0.1", port)
        await restarted.start()
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    outputs = await collect(client.generate("b", "x", SamplingParams(max_tokens=2), 0.0))
                    break
                except ReplicaUnavailable:
                    assert time.monotonic() < deadline, "the client did not reconnect"
                    await asyncio.sleep(0.05)
            assert outputs[-1].finished
        finally:
            await restarted.stop(0)
    run_with_replica(scenario)
