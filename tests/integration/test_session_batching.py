"""Starting requests in batches on the Session call: one message may start several (more_generates),
and the gateway's client folds the requests that queue up behind a write into one message."""

from __future__ import annotations

import asyncio

import pytest

from scalellm.protocol.types import SamplingParams
from scalellm.rpc import convert
from tests.integration.test_replica_grpc import _open_session, run_with_replica, wait_idle

pytestmark = pytest.mark.timeout(60)


def test_one_message_starts_several_requests_and_a_duplicate_fails_alone():
    async def scenario(engine, client, server):
        channel, call = await _open_session(server)
        try:
            await call.write(convert.session_generate_many([
                convert.encode_request(request_id, "a b", SamplingParams(max_tokens=4), 0.0)
                for request_id in ("one", "two", "one")]))
            tokens: dict[str, list[int]] = {}
            errors = []
            while sum(len(t) for t in tokens.values()) < 8 or not errors:
                response = await call.read()
                errors += convert.session_errors(response)
                for request_id, chunk in convert.session_chunks(response):
                    tokens.setdefault(request_id, []).extend(chunk.outputs[0].token_ids)
            assert tokens == {"one": [0, 1, 2, 3], "two": [0, 1, 2, 3]}
            assert [(request_id, code) for request_id, code, _ in errors] == [("one", 3)]  # INVALID_ARGUMENT
        finally:
            call.cancel()
            await channel.close()
        await wait_idle(engine)
    run_with_replica(scenario, tpot_ms=5.0)


def test_requests_started_together_share_messages_and_all_complete(monkeypatch):
    batches: list[int] = []
    many = convert.session_generate_many

    def counting(requests):
        batches.append(len(requests))
        return many(requests)
    monkeypatch.setattr(convert, "session_generate_many", counting)

    async def scenario(engine, client, server):
        async def one(i):
            params = SamplingParams(max_tokens=3 + i % 4)
            return [t async for o in client.generate(f"r{i}", "a b c", params, 0.0) for t in o.outputs[0].token_ids]
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = run_with_replica(scenario, tpot_ms=5.0)
    assert results == [list(range(3 + i % 4)) for i in range(32)]
    assert sum(batches) == 32 and len(batches) < 32, batches
