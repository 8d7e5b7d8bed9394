"""An in-process replica: the `ReplicaClient` interface over an `EngineClient`, with no gRPC hop.

`scalellm serve --no-gateway` serves the gateway's HTTP app from the process that holds the engine:

    clients ──HTTP/SSE──▶ GatewayApp ──LocalReplicaClient (function calls, same event loop)──▶ engine

It does what the replica's gRPC service does for one request (stamp the replica receive time, map
engine errors onto the statuses the gateway expects, abort the engine request when the caller stops
reading early), so the gateway code paths are the same and benchmarks show what the gRPC hop and the
second process cost. The client owns the engine: `start()` starts it, `close()` shuts it down.
"""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator, Callable

from scalellm.engine.client import EngineClient
from scalellm.gateway.app import GatewayApp, serve_until_signalled
from scalellm.gateway.config import GatewayConfig
from scalellm.process import freeze_loaded_objects
from scalellm.protocol.types import (EngineHealth, EngineLoad, PromptInput, RequestMetrics, RequestOutput,
                                     SamplingParams)
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable

logger = logging.getLogger(__name__)

LOCAL_ADDRESS = "local"


class LocalReplicaClient:
    """Calls an `EngineClient` running in this process's event loop; same interface as `ReplicaClient`."""

    def __init__(self, engine: EngineClient) -> None:
        self.address = LOCAL_ADDRESS
        self.engine = engine
        self._closed = False

    async def start(self) -> None:
        """Start the engine (inside the running event loop, before the HTTP server takes requests)."""
        await self.engine.start()

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       gateway_receive_time: float, timeout_s: float | None = None,
                       trace_context: dict[str, str] | None = None, final_only: bool = False
                       ) -> AsyncIterator[RequestOutput]:
        """Stream the engine's delta RequestOutputs; the last has finished=True and carries the timings.

        Raises ReplicaError(400) for input the engine rejects, ReplicaUnavailable when the engine fails
        before the first output and ReplicaError(500) after it. `timeout_s` is accepted for interface
        parity only: the gateway enforces the same deadline around the whole request, and
        `trace_context` too (in one process the gateway's spans are the whole trace). Closing the
        iterator early aborts the request in the engine. `final_only`: one output, when the request
        finishes (EngineClient.generate).
        """
        metrics = RequestMetrics(gateway_receive_time=gateway_receive_time, replica_receive_time=time.time())
        extra = {"final_only": True} if final_only else {}
        stream = self.engine.generate(request_id, prompt, params, metrics, **extra)
        received = finished = False
        try:
            async for output in stream:
                received = True
                finished = output.finished
                yield output
        except ValueError as error:
            raise ReplicaError(str(error), 400) from None
        except Exception as error:  # noqa: BLE001 - an engine failure reaches the gateway as a status
            logger.exception("request %s failed in the engine", request_id)
            if not received:
                raise ReplicaUnavailable(f"engine error: {error}") from None
            raise ReplicaError(f"engine error: {error}", 500) from None
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if not finished:
                await self.engine.abort(request_id)

    async def health(self, timeout_s: float = 1.0) -> EngineHealth:
        """The engine's own health check (a failing check is an unhealthy engine)."""
        try:
            return self.engine.health()
        except Exception as error:  # noqa: BLE001
            return EngineHealth(False, f"health check failed: {error!r}")

    async def load(self, timeout_s: float = 1.0) -> EngineLoad:
        """The engine's current load."""
        return self.engine.load()

    async def info(self, timeout_s: float = 2.0) -> tuple[str, int, str]:
        """(model_name, max_model_len, weights) of the engine."""
        return self.engine.model_name, self.engine.max_model_len, self.engine.weights

    async def close(self) -> None:
        """Shut the engine down (aborts whatever is still in flight); later calls do nothing."""
        if not self._closed:
            self._closed = True
            await self.engine.shutdown()


async def serve_local_until_signalled(engine: EngineClient, config: GatewayConfig,
                                      on_started: Callable[[GatewayApp], None] | None = None) -> None:
    """Start `engine`, serve the gateway's HTTP API over it until SIGTERM/SIGINT, drain, then stop both."""
    client = LocalReplicaClient(engine)
    await client.start()
    freeze_loaded_objects()
    try:
        await serve_until_signalled(config, [client], on_started)
    finally:
        await client.close()


def run_local_server(engine: EngineClient, config: GatewayConfig,
                     on_started: Callable[[GatewayApp], None] | None = None) -> None:
    """Run `serve_local_until_signalled` in this process (blocking), on uvloop."""
    import uvloop

    uvloop.run(serve_local_until_signalled(engine, config, on_started))
