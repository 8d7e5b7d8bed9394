"""Fake replicas (the ReplicaClient shape, no sockets) and a gateway run on a background thread."""

from __future__ import annotations

import asyncio
import threading
import time

import uvloop

from scalellm.gateway.app import GatewayApp
from scalellm.gateway.config import GatewayConfig
from scalellm.protocol.types import (CompletionOutput, EngineHealth, EngineLoad, Logprob, RequestMetrics,
                                     RequestOutput)
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable

FAKE_MODEL = "fake-model"


class FakeReplica:
    """Streams words " w0", " w1", … one token each; honours n, max_tokens, stop and logprobs."""

    def __init__(self, address: str, *, num_chunks: int = 4, delay_s: float = 0.0,
                 unavailable: bool = False, max_model_len: int = 64) -> None:
        self.address = address
        self.num_chunks = num_chunks
        self.delay_s = delay_s
        self.unavailable = unavailable
        self.max_model_len = max_model_len
        self.num_active = 0
        self.num_served = 0
        self.num_closed_early = 0

    async def generate(self, request_id, prompt, params, gateway_receive_time, timeout_s=None, final_only=False):
        if self.unavailable:
            raise ReplicaUnavailable(f"replica {self.address}: connection refused")
        if isinstance(prompt, str) and len(prompt) > self.max_model_len:
            raise ReplicaError(f"the prompt ({len(prompt)} tokens) is longer than the context "
                               f"({self.max_model_len})", 400)
        num_steps = min(self.num_chunks, params.max_tokens or self.num_chunks)
        self.num_active += 1
        finished = False
        try:
            for step in range(num_steps):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                text = f" w{step}"
                stopped = any(s in text for s in params.stop)
                last = stopped or step == num_steps - 1
                reason = ("stop" if stopped else "length") if last else None
                outputs = [CompletionOutput(i, "" if stopped else text, [100 + step],
                                            logprobs=_logprobs(step, params.logprobs), finish_reason=reason)
                           for i in range(params.n)]
                metrics = RequestMetrics(gateway_receive_time, time.time()) if last else None
                yield RequestOutput(request_id, outputs, finished=last, num_prompt_tokens=7, metrics=metrics)
                if last:
                    break
            finished = True
            self.num_served += 1
        finally:
            self.num_active -= 1
            if not finished:
                self.num_closed_early += 1

    async def health(self, timeout_s: float = 1.0) -> EngineHealth:
        if self.unavailable:
            raise ReplicaUnavailable(f"replica {self.address}: connection refused")
        return EngineHealth(True)

    async def load(self, timeout_s: float = 1.0) -> EngineLoad:
        return EngineLoad(self.num_active, 0, 90, 100, 0)

    async def info(self, timeout_s: float = 2.0) -> tuple[str, int, str]:
        return FAKE_MODEL, self.max_model_len, "fake"

    async def close(self) -> None:
        pass


def _logprobs(step: int, k: int | None):
    if k is None:
        return None
    entry = {100 + step: Logprob(-0.5, 1, f" w{step}")}
    for rank in range(2, k + 2):
        entry[900 + rank] = Logprob(-1.0 * rank, rank, f" alt{rank}")
    return [entry]


class GatewayThread:
    """A GatewayApp on port 0, served by an event loop on a daemon thread."""

    def __init__(self, config: GatewayConfig, clients) -> None:
        self.app = GatewayApp(config, clients=clients)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.app.start())
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> "GatewayThread":
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.app.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, fn):
        """Run fn() on the gateway's loop and return its result."""
        async def wrapper():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"


class MockCluster:
    """Mock-engine replicas behind real gRPC servers and a gateway, on one event loop on a background thread."""

    def __init__(self, num_replicas: int = 1, tpot_ms: float = 1.0, max_model_len: int = 64,
                 engine_options: dict | None = None, **gateway) -> None:
        """engine_options: further MockEngine arguments (max_num_seqs, ...); gateway: GatewayConfig fields."""
        from scalellm.replica.mock_engine import MockEngine
        from scalellm.rpc.server import ReplicaServer

        self._make_engine = lambda: MockEngine("mock-model", tpot_ms=tpot_ms, max_model_len=max_model_len,
                                               **(engine_options or {}))
        self._make_server = ReplicaServer
        self._num_replicas, self._gateway = num_replicas, gateway
        self.engines, self.servers = [], []
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self._start())

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(20)

    async def _start(self) -> None:
        for _ in range(self._num_replicas):
            engine = self._make_engine()
            await engine.start()
            server = self._make_server(engine, "127.0.0.1", 0)
            await server.start()
            self.engines.append(engine)
            self.servers.append(server)
        config = GatewayConfig(replica_addresses=tuple(s.address for s in self.servers), port=0, **self._gateway)
        self.app = GatewayApp(config)
        await self.app.start()
        await self.app.monitor.probe_all()

    async def _stop(self) -> None:
        await self.app.shutdown()
        for server, engine in zip(self.servers, self.engines):
            await server.stop(0)
            await engine.shutdown()

    def close(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.app.port}"
