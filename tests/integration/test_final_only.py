"""final_only: a non-streamed request's replica sends one message with the whole result, and the
gateway's response is the one the per-step chunks would have built (text, usage, logprobs, stop
strings, n > 1, resumed output). A real grpc.aio replica over the mock engine, in process."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import uvloop

from scalellm.gateway.rendering import ResponseBuilder
from scalellm.protocol.openai import parse_chat_request, parse_completion_request
from scalellm.protocol.types import ResumedSample
from scalellm.replica.mock_engine import MockEngine
from scalellm.rpc.client import ReplicaClient
from scalellm.rpc.server import ReplicaServer

pytestmark = pytest.mark.timeout(60)

CASES = {
    "chat, n=2, logprobs, stop string": (True, {"messages": [{"role": "user", "content": "say something"}],
                                                "n": 2, "max_tokens": 12, "logprobs": True, "top_logprobs": 2,
                                                "stop": ["tok5"]}),
    "completion, logprobs, stop string kept": (False, {"prompt": "one two three", "max_tokens": 10, "logprobs": 3,
                                                       "stop": ["tok4"], "include_stop_str_in_output": True}),
    "completion, n=3, echo, length": (False, {"prompt": "one two", "n": 3, "max_tokens": 7, "echo": True}),
    "chat, stop token id": (True, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
                                   "stop_token_ids": [6]}),
}


def run_with_replica(scenario):
    async def main():
        engine = MockEngine(tpot_ms=1.0, max_model_len=64)
        await engine.start()
        server = ReplicaServer(engine, "127.0.0.1", 0)
        await server.start()
        client = ReplicaClient(server.address)
        try:
            return await scenario(client)
        finally:
            await client.close()
            await server.stop(0)
            await engine.shutdown()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def body_from(parsed, outputs) -> dict:
    """The non-streamed response the gateway builds from `outputs` (fixed id and time, no timings)."""
    builder = ResponseBuilder(parsed, "req-1", 1700000000, "mock")
    for output in outputs:
        builder.add(output)
    return orjson.loads(builder.render())


@pytest.mark.parametrize("case", CASES)
def test_final_only_builds_the_same_response_as_the_chunks(case):
    chat, request = CASES[case]
    parse = parse_chat_request if chat else parse_completion_request
    parsed = parse(orjson.dumps({"model": "mock", **request}), 64, 256)

    async def scenario(client):
        chunks = [o async for o in client.generate("a", parsed.prompt, parsed.params, 0.0)]
        final = [o async for o in client.generate("b", parsed.prompt, parsed.params, 0.0, final_only=True)]
        return chunks, final

    chunks, final = run_with_replica(scenario)
    assert len(chunks) > 1 and len(final) == 1 and final[0].finished
    assert final[0].metrics is not None and final[0].metrics.first_token_time > 0
    assert final[0].num_prompt_tokens == chunks[0].num_prompt_tokens
    expected, got = body_from(parsed, chunks), body_from(parsed, final)
    assert got == expected
    assert expected["usage"]["completion_tokens"] > 0


def test_final_only_after_resumed_tokens_holds_only_the_new_output():
    parsed = parse_completion_request(orjson.dumps({"model": "mock", "prompt": "a b", "max_tokens": 8,
                                                    "logprobs": 1}), 64, 256)

    async def scenario(client):
        delivered = [ResumedSample(0, (0, 1, 2), -1.5)]
        chunks = [o async for o in client.generate("a", parsed.prompt, parsed.params, 0.0,
                                                   resumed_samples=delivered)]
        final = [o async for o in client.generate("b", parsed.prompt, parsed.params, 0.0,
                                                  resumed_samples=delivered, final_only=True)]
        return chunks, final

    chunks, final = run_with_replica(scenario)
    assert len(final) == 1
    assert [t for o in chunks for c in o.outputs for t in c.token_ids] == final[0].outputs[0].token_ids == \
        [3, 4, 5, 6, 7]
    assert body_from(parsed, final) == body_from(parsed, chunks)
    assert final[0].outputs[0].text == " tok3 tok4 tok5 tok6 tok7"


def test_in_process_replica_gives_one_output_too():
    """`serve --no-gateway` (LocalReplicaClient over the engine) honours final_only the same way."""
    from scalellm.gateway.local_replica import LocalReplicaClient

    parsed = parse_completion_request(orjson.dumps({"model": "mock", "prompt": "a b", "max_tokens": 6, "n": 2,
                                                    "stop": ["tok4"]}), 64, 256)

    async def main():
        client = LocalReplicaClient(MockEngine(tpot_ms=1.0, max_model_len=64))
        await client.start()
        try:
            chunks = [o async for o in client.generate("a", parsed.prompt, parsed.params, 0.0)]
            final = [o async for o in client.generate("b", parsed.prompt, parsed.params, 0.0, final_only=True)]
        finally:
            await client.close()
        return chunks, final

    chunks, final = asyncio.run(main())
    assert len(final) == 1 and final[0].finished
    assert body_from(parsed, final) == body_from(parsed, chunks)
    assert [c.finish_reason for c in final[0].outputs] == ["stop", "stop"]
