"""The replica's gRPC service: the Replica service of proto/scalellm/v1/replica.proto over an EngineClient.

Per streamed token the service does one conversion and one gRPC write; everything else (tokenizing,
the chat template, detokenizing) is the engine's. Cancelling the call aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import time
from typing import Any, AsyncIterator

import grpc

from scalellm.engine.client import EngineClient
from scalellm.protocol.types import EngineHealth, RequestMetrics
from scalellm.replica import convert

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVER_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second replica on the same port must fail, not share it
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class ReplicaService:
    """The Replica service's handlers; they see protobuf messages only as values from `convert`."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine
        self._num_requests_received = 0

    async def generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Stream one request's outputs; the engine request is aborted if the call ends early."""
        receive_time = time.time()
        self._num_requests_received += 1
        try:
            args = convert.decode_request(request)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        metrics = RequestMetrics(gateway_receive_time=args.gateway_receive_time,
                                 replica_receive_time=receive_time)
        stream = self._engine.generate(args.request_id, args.prompt, args.params, metrics)
        num_generated = 0
        first = True
        finished = False
        try:
            async for output in stream:
                for completion in output.outputs:
                    num_generated += len(completion.token_ids)
                finished = output.finished
                yield convert.encode_output(output, num_generated, first=first)
                first = False
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except Exception as error:  # noqa: BLE001 - an engine failure must reach the gateway as a status
            logger.exception("request %s failed in the engine", args.request_id)
            # Before any output the gateway may still retry on another replica: report UNAVAILABLE.
            code = grpc.StatusCode.UNAVAILABLE if first else grpc.StatusCode.INTERNAL
            await context.abort(code, f"engine error: {error}")
        finally:
            await _close(stream)
            if not finished:
                await self._engine.abort(args.request_id)

    async def health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """SERVING or NOT_SERVING, from the engine's own health check."""
        try:
            health = self._engine.health()
        except Exception as error:  # noqa: BLE001 - a failing check is an unhealthy engine
            health = EngineHealth(False, f"health check failed: {error!r}")
        return convert.encode_health(health)

    async def load(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The engine's current load, with the requests this service received."""
        load = dataclasses.replace(self._engine.load(), num_requests_received=self._num_requests_received)
        return convert.encode_load(load)

    async def info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The served model's name and context length."""
        return convert.encode_info(self._engine.model_name, self._engine.max_model_len)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The method table to register on a grpc.aio server."""
        generate = convert.GENERATE
        handlers = {generate.name: grpc.unary_stream_rpc_method_handler(
            self.generate, request_deserializer=generate.request_deserializer,
            response_serializer=generate.response_serializer)}
        for method, function in ((convert.HEALTH, self.health), (convert.LOAD, self.load),
                                 (convert.INFO, self.info)):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                function, request_deserializer=method.request_deserializer,
                response_serializer=method.response_serializer)
        return grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers)


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class ListenError(RuntimeError):
    """The server could not bind its address (taken, or not an address of this machine)."""


class ReplicaServer:
    """A grpc.aio server serving one engine on HOST:PORT (port 0 picks a free one)."""

    def __init__(self, engine: EngineClient, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        """HOST:PORT clients connect to (valid after `start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving (the engine must already be started). Raises ListenError if the port is taken."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        server.add_generic_rpc_handlers((ReplicaService(self.engine).rpc_handler(),))
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise ListenError(f"cannot listen on {self.address}: {error}") from error
        await server.start()
        self._server = server

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Refuse new calls, let calls in flight finish for up to `grace_s`, then cancel them."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None


async def serve_until_signal(engine: EngineClient, host: str, port: int, grace_s: float = 5.0) -> None:
    """Start the engine and the server, serve until SIGTERM or SIGINT, then stop both."""
    await engine.start()
    server = ReplicaServer(engine, host, port)
    try:
        await server.start()
        logger.info("replica serving %s on %s (max_model_len %d)", engine.model_name, server.address,
                    engine.max_model_len)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("replica on %s stopping", server.address)
    finally:
        await server.stop(grace_s)
        await engine.shutdown()
