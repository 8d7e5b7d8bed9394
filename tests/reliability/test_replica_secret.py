"""Replicas listening beyond loopback serve only their deployment's gateway (a per-deployment secret)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from procs import MOCK, Serve, chat_body, http

from scalellm.rpc.client import ReplicaClient, ReplicaError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


async def _health(port: str, secret: str | None = None):
    client = ReplicaClient(f"127.0.0.1:{port}", secret=secret)
    try:
        return await client.health()
    finally:
        await client.close()


def test_replicas_on_every_interface_refuse_callers_without_the_deployment_secret():
    serve = Serve(*MOCK, "--tpot-ms", "1", "--replicas", "2", "--replica-host", "0.0.0.0")
    try:
        replicas = serve.children("replica")
        assert len(replicas) == 2
        for process in (*replicas.values(), *serve.children("gateway").values()):
            assert not any("secret" in arg for arg in process.cmdline())  # never on a command line
        status, body = http(serve.port, "POST", "/v1/chat/completions", chat_body(4, False))
        assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3"
        for port in replicas:
            for secret in (None, "guessed"):
                with pytest.raises(ReplicaError, match="secret"):
                    asyncio.run(_health(port, secret))
    finally:
        serve.stop()


def test_replicas_on_loopback_need_no_secret():
    serve = Serve(*MOCK, "--tpot-ms", "1", "--replicas", "1")
    try:
        (port,) = serve.children("replica")
        assert asyncio.run(_health(port)).healthy
    finally:
        serve.stop()
