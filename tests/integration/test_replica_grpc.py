"""A real grpc.aio replica server over the mock engine, called through the gateway's ReplicaClient."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import uvloop

from scalellm.protocol.types import ChatPrompt, SamplingParams
from scalellm.replica.mock_engine import MockEngine
from scalellm.rpc.client import ReplicaClient, ReplicaError, ReplicaUnavailable
from scalellm.rpc.server import ReplicaServer

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


async def wait_running(engine, num_running, timeout_s=2.0):
    deadline = time.monotonic() + timeout_s
    while engine.load().num_running != num_running:
        assert time.monotonic() < deadline, f"expected {num_running} running: {engine.load()}"
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
        assert await client.info() == ("mock", 64, "fake model, no weights")
        load = await client.load()
        assert (load.num_running, load.num_waiting, load.num_tokens_in_flight) == (0, 0, 0)
        assert load.num_free_blocks == load.num_total_blocks > 0
        await engine.shutdown()
        health = await client.health()
        assert not health.healthy and "engine loop" in health.detail
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


def test_only_the_session_transport_is_served():
    """There is no per-request Generate RPC: a call to it is UNIMPLEMENTED, the Session call serves."""
    async def scenario(engine, client, server):
        import grpc

        from scalellm.rpc import convert
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = channel.unary_stream("/scalellm.v1.Replica/Generate",
                                        request_serializer=convert.SESSION.request_serializer,
                                        response_deserializer=convert.SESSION.response_deserializer)
            request = convert.session_generate(
                convert.encode_request("g", "a b", SamplingParams(max_tokens=4), 0.0))
            with pytest.raises(grpc.aio.AioRpcError) as error:
                [chunk async for chunk in call(request)]
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        outputs = [o async for o in client.generate("s", "a b", SamplingParams(max_tokens=4), 0.0)]
        # a slow reader may get steps coalesced into one chunk: the tokens, not the chunking, are the contract
        assert [t for o in outputs for t in o.outputs[0].token_ids] == [0, 1, 2, 3]
        assert outputs[-1].finished
    run_with_replica(scenario)


async def _open_session(server):
    import grpc

    from scalellm.rpc import convert
    channel = grpc.aio.insecure_channel(server.address)
    method = convert.SESSION
    call = channel.stream_stream(method.path, request_serializer=method.request_serializer,
                                 response_deserializer=method.response_deserializer)()
    return channel, call


def test_session_sends_a_step_of_many_requests_in_one_message():
    async def scenario(engine, client, server):
        from scalellm.rpc import convert
        channel, call = await _open_session(server)
        try:
            for i in range(8):
                await call.write(convert.session_generate(
                    convert.encode_request(f"r{i}", "a b", SamplingParams(max_tokens=6), 0.0)))
            tokens: dict[str, list[int]] = {}
            largest = 0
            while sum(len(t) for t in tokens.values()) < 48:
                response = await call.read()
                pairs = convert.session_chunks(response)
                largest = max(largest, len(pairs))
                for request_id, chunk in pairs:
                    tokens.setdefault(request_id, []).extend(chunk.outputs[0].token_ids)
            assert tokens == {f"r{i}": list(range(6)) for i in range(8)}
            assert largest >= 4, "the chunks of one engine step should share a message"
        finally:
            call.cancel()
            await channel.close()
    run_with_replica(scenario, tpot_ms=20.0)


def test_session_cancel_aborts_only_that_request_and_ending_it_aborts_the_rest():
    async def scenario(engine, client, server):
        from scalellm.rpc import convert
        channel, call = await _open_session(server)
        tokens = {"keep": 0, "drop": 0}

        async def read():
            async for response in call:
                for request_id, chunk in convert.session_chunks(response):
                    tokens[request_id] += len(chunk.outputs[0].token_ids)
        reader = asyncio.create_task(read())
        try:
            for request_id in ("keep", "drop"):
                await call.write(convert.session_generate(
                    convert.encode_request(request_id, "x", SamplingParams(max_tokens=60), 0.0)))
            deadline = time.monotonic() + 2
            while engine.load().num_running != 2 or not tokens["drop"]:
                assert time.monotonic() < deadline, engine.load()
                await asyncio.sleep(0.01)
            await call.write(convert.session_cancel("drop"))
            await call.write(convert.session_cancel("unknown"))  # ignored
            while engine.load().num_running != 1:
                assert time.monotonic() < deadline, engine.load()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            dropped, kept = tokens["drop"], tokens["keep"]
            await asyncio.sleep(0.2)
            assert tokens["drop"] == dropped < 60 and tokens["keep"] > kept
        finally:
            call.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await channel.close()
        await wait_idle(engine)  # ending the call aborted "keep"
    run_with_replica(scenario, tpot_ms=20.0)


def test_session_reports_bad_requests_and_duplicate_ids_per_request():
    async def scenario(engine, client, server):
        from scalellm.rpc import convert
        channel, call = await _open_session(server)
        try:
            await call.write(convert.session_generate(convert.encode_request("bad", "", SamplingParams(), 0.0)))
            await call.write(convert.session_generate(
                convert.encode_request("twice", "x", SamplingParams(max_tokens=60), 0.0)))
            await call.write(convert.session_generate(
                convert.encode_request("twice", "x", SamplingParams(max_tokens=60), 0.0)))
            errors = []
            while len(errors) < 2:
                errors += convert.session_errors(await call.read())
            by_id = {request_id: (code, message) for request_id, code, message in errors}
            assert by_id["bad"][0] == by_id["twice"][0] == 3  # INVALID_ARGUMENT
            assert "empty" in by_id["bad"][1] and "already running" in by_id["twice"][1]
            await wait_running(engine, 1)  # the first "twice" runs on (the load is the engine's last step's)
        finally:
            call.cancel()
            await channel.close()
        await wait_idle(engine)
    run_with_replica(scenario, tpot_ms=20.0)


def test_a_stopping_replica_finishes_its_requests_and_refuses_new_ones():
    async def scenario(engine, client, server):
        stream = client.generate("a", "x", SamplingParams(max_tokens=10), 0.0)
        first = await stream.__anext__()  # running for sure, however slow the machine
        running = asyncio.create_task(collect(stream))
        stopping = asyncio.create_task(server.stop(5))
        await asyncio.sleep(0.02)
        with pytest.raises(ReplicaUnavailable):
            await collect(client.generate("b", "x", SamplingParams(max_tokens=2), 0.0))
        outputs = [first, *await running]
        assert outputs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outputs) == 10
        started = time.monotonic()
        await stopping
        assert time.monotonic() - started < 2, "an idle session must not hold the server's grace period"
    run_with_replica(scenario, tpot_ms=20.0)


def test_abort_in_flight_fails_requests_as_retriable_until_output_arrived():
    async def scenario(engine, client, server):
        stream = client.generate("a", "x", SamplingParams(max_tokens=60), 0.0)
        await stream.__anext__()
        waiting = asyncio.create_task(collect(client.generate("b", "x", SamplingParams(max_tokens=60), 0.0)))
        await asyncio.sleep(0)
        assert client.abort_in_flight() == 2
        with pytest.raises(ReplicaError) as info:
            async for _ in stream:  # an output that arrived before the abort still comes first
                pass
        assert not isinstance(info.value, ReplicaUnavailable) and "stopped responding" in info.value.message
        with pytest.raises(ReplicaUnavailable):
            await waiting
        await wait_idle(engine)
        outputs = await collect(client.generate("c", "x", SamplingParams(max_tokens=2), 0.0))
        assert outputs[-1].finished  # a new session serves the next request
    run_with_replica(scenario, tpot_ms=20.0, max_num_seqs=1)


def test_a_replica_with_a_secret_refuses_calls_without_it_and_counts_them():
    async def main():
        engine = MockEngine(tpot_ms=1.0, max_model_len=64)
        await engine.start()
        server = ReplicaServer(engine, "127.0.0.1", 0, secret="s3cret")
        await server.start()
        clients = {name: ReplicaClient(server.address, secret=secret)
                   for name, secret in (("none", None), ("wrong", "s3cre"), ("right", "s3cret"))}
        try:
            for name in ("none", "wrong"):
                with pytest.raises(ReplicaError) as refused:
                    await clients[name].health()
                assert "secret" in refused.value.message
                with pytest.raises(ReplicaError) as refused:
                    await collect(clients[name].generate("r", "a b", SamplingParams(max_tokens=2), 0.0))
                assert refused.value.status_code == 502 and "secret" in refused.value.message
            assert server.secret_check.num_refused == 4
            assert (await clients["right"].health()).healthy
            outputs = await collect(clients["right"].generate("r", "a b", SamplingParams(max_tokens=2), 0.0))
            assert "".join(c.text for o in outputs for c in o.outputs) == "tok0 tok1"
            assert server.secret_check.num_refused == 4
        finally:
            for client in clients.values():
                await client.close()
            await server.stop(0)
            await engine.shutdown()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
