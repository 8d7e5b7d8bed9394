"""LocalReplicaClient: the ReplicaClient interface over an in-process engine (the mock one here)."""

import asyncio
import time

import pytest

from scalellm.gateway.local_replica import LocalReplicaClient
from scalellm.protocol.types import SamplingParams
from scalellm.replica.mock_engine import MockEngine
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable


class FailingEngine(MockEngine):
    """Fails every request before its first output."""

    async def generate(self, request_id, prompt, params, metrics=None):
        raise RuntimeError("boom")
        yield  # an async generator, like the real engines


def run(test):
    """Run `test(client)` against a started client over a fast mock engine, then close it."""
    async def main():
        client = LocalReplicaClient(MockEngine("mock", tpot_ms=1.0, max_model_len=16))
        await client.start()
        try:
            return await test(client)
        finally:
            await client.close()
            await client.close()  # closing twice is harmless
    return asyncio.run(main())


def test_streams_outputs_with_timings_on_the_last():
    async def test(client):
        sent = time.time()
        outputs = [o async for o in client.generate("r1", "a b", SamplingParams(max_tokens=3), sent)]
        assert "".join(c.text for o in outputs for c in o.outputs) == "tok0 tok1 tok2"
        metrics = outputs[-1].metrics
        assert outputs[-1].finished and metrics.gateway_receive_time == sent
        assert sent <= metrics.replica_receive_time <= metrics.first_token_time <= metrics.last_token_time
    run(test)


def test_rejected_input_is_a_400():
    async def test(client):
        with pytest.raises(ReplicaError) as error:
            [o async for o in client.generate("r2", "w " * 40, SamplingParams(max_tokens=2), time.time())]
        assert error.value.status_code == 400 and not isinstance(error.value, ReplicaUnavailable)
    run(test)


def test_closing_early_aborts_the_engine_request():
    async def test(client):
        stream = client.generate("r3", "a", SamplingParams(max_tokens=10), time.time())
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)
        load = await client.load()
        assert (load.num_running, load.num_waiting) == (0, 0)
    run(test)


def test_engine_failure_before_output_is_retriable():
    async def main():
        client = LocalReplicaClient(FailingEngine("mock"))
        await client.start()
        try:
            with pytest.raises(ReplicaUnavailable):
                [o async for o in client.generate("r4", "a", SamplingParams(max_tokens=2), time.time())]
        finally:
            await client.close()
    asyncio.run(main())


def test_health_load_info():
    async def test(client):
        assert client.address == "local"
        assert (await client.health()).healthy
        assert await client.info() == ("mock", 16, "fake model, no weights")
        assert (await client.load()).num_running == 0
    run(test)
