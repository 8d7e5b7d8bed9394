"""The replica's gRPC service: the Replica service of proto/scalellm/v1/replica.proto over an EngineClient.

Per streamed token the service does one conversion; a Session call writes one message per batch of
chunks (every request that moved in an engine step). Everything else (tokenizing, the chat template,
detokenizing) is the engine's. Ending a call early aborts its requests in the engine.

Stopping (SIGTERM: a shape change, a scale-down, shutdown) hands requests over rather than making the
gateway wait: the requests with no output yet end at once, those running after a bound (`grace_s`),
each with UNAVAILABLE; the gateway runs the first again on another replica and resumes the others
there after their delivered tokens (gateway/failover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import time
from typing import Any, AsyncIterator, Callable

import grpc

from scalellm.engine.client import EngineClient
from scalellm.protocol.types import EngineHealth, RequestMetrics
from scalellm.rpc import convert
from scalellm.rpc.auth import SecretCheck
from scalellm.rpc.channel import SERVER_OPTIONS

logger = logging.getLogger(__name__)

HANDOVER_MESSAGE = "the replica is stopping: continue on another replica"


class _RequestFailed(Exception):
    """A request ended in an error: the gRPC status its SessionError carries."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ReplicaService:
    """The Replica service's handlers; they see protobuf messages only as values from `convert`."""

    def __init__(self, engine: EngineClient, tracing=None) -> None:
        """tracing: the process's `scalellm.tracing` Tracing, None when tracing is off."""
        self._engine = engine
        self._tracing = tracing
        if tracing is not None:
            from scalellm.tracing.replica import ReplicaRequestTrace

            self._request_trace = ReplicaRequestTrace
        self._num_requests_received = 0
        self._stopping = False
        self._sessions: dict[_Outbox, dict[str, asyncio.Task]] = {}

    def stop_admitting(self) -> None:
        """Refuse new requests (UNAVAILABLE, safe to retry elsewhere), hand over those with no output
        yet, and end idle Session calls."""
        self._stopping = True
        self.hand_over(running=False)
        for outbox in self._sessions:
            outbox.wake()

    def hand_over(self, running: bool) -> int:
        """End requests with UNAVAILABLE for the gateway to continue elsewhere: those with no output yet,
        and with `running` every one. Returns how many; their engine requests are aborted."""
        count = 0
        for outbox, runs in self._sessions.items():
            for request_id, run in list(runs.items()):
                if running or request_id not in outbox.started:
                    outbox.fail(request_id, grpc.StatusCode.UNAVAILABLE, HANDOVER_MESSAGE)
                    run.cancel()
                    count += 1
        return count

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is in flight on any Session call; False when `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while any(self._sessions.values()):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def session(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Serve the requests that arrive on one Session call; each message sent holds every chunk and
        error produced since the last. Ends when the client is done sending and its requests are
        finished, or, once the replica is stopping, when none is left; ending early aborts them all."""
        outbox = _Outbox()
        runs: dict[str, asyncio.Task] = {}
        reader = asyncio.create_task(self._accept(requests, outbox, runs))
        self._sessions[outbox] = runs
        try:
            while True:
                await outbox.ready.wait()
                outbox.ready.clear()
                if outbox:
                    yield outbox.take()
                if not runs and (reader.done() or self._stopping):
                    return
        finally:
            self._sessions.pop(outbox, None)
            reader.cancel()
            for run in runs.values():
                run.cancel()
            await asyncio.gather(reader, *runs.values(), return_exceptions=True)

    async def _accept(self, requests: AsyncIterator[Any], outbox: _Outbox, runs: dict[str, asyncio.Task]) -> None:
        """Start the session's requests and carry out its cancellations, until the client is done sending."""
        try:
            async for message in requests:
                for kind, value in convert.decode_session_request(message):
                    if kind == "generate":
                        self._start(value, outbox, runs)
                    else:
                        run = runs.get(value)
                        if run is not None:
                            run.cancel()
        finally:
            outbox.wake()

    def _start(self, request: Any, outbox: _Outbox, runs: dict[str, asyncio.Task]) -> None:
        request_id = request.request_id
        if request_id in runs:
            outbox.fail(request_id, grpc.StatusCode.INVALID_ARGUMENT,
                        f"request id {request_id!r} is already running on this session")
            return
        run = asyncio.create_task(self._run(request, outbox))
        runs[request_id] = run
        run.add_done_callback(functools.partial(_finished, runs, request_id, outbox))

    async def _run(self, request: Any, outbox: _Outbox) -> None:
        request_id = request.request_id
        try:
            async with contextlib.aclosing(self._chunks(request)) as chunks:
                async for chunk in chunks:
                    outbox.put(request_id, chunk)
        except _RequestFailed as failure:
            outbox.fail(request_id, failure.code, failure.message)

    async def _chunks(self, request: Any) -> AsyncIterator[Any]:
        """One request's GenerateChunks; raises _RequestFailed with the status its SessionError carries.
        Closing the iterator before the last chunk aborts the request in the engine."""
        receive_time = time.time()
        self._num_requests_received += 1
        try:
            args = convert.decode_request(request)
        except ValueError as error:
            raise _RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if self._stopping:
            raise _RequestFailed(grpc.StatusCode.UNAVAILABLE, "the replica is shutting down")
        metrics = RequestMetrics(gateway_receive_time=args.gateway_receive_time,
                                 replica_receive_time=receive_time)
        trace = None
        if self._tracing is not None:
            trace = self._request_trace(self._tracing, convert.trace_context(request), args.request_id,
                                        self._engine.model_name, args.params, metrics)
        extra = {"resumed_samples": args.resumed_samples} if args.resumed_samples else {}
        if args.final_only:
            extra["final_only"] = True
        stream = self._engine.generate(args.request_id, args.prompt, args.params, metrics, **extra)
        num_generated = 0
        first = True
        finished = False
        try:
            async for output in stream:
                for completion in output.outputs:
                    num_generated += len(completion.token_ids)
                finished = output.finished
                if trace is not None:
                    trace.observe(output)
                yield convert.encode_output(output, num_generated, first=first)
                first = False
        except ValueError as error:
            raise _RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        except Exception as error:  # noqa: BLE001 - an engine failure must reach the gateway as a status
            logger.exception("request %s failed in the engine", args.request_id)
            # Before any output the gateway may still retry on another replica: report UNAVAILABLE.
            code = grpc.StatusCode.UNAVAILABLE if first else grpc.StatusCode.INTERNAL
            raise _RequestFailed(code, f"engine error: {error}") from None
        finally:
            await _close(stream)
            if not finished:
                await self._engine.abort(args.request_id)
            if trace is not None:
                trace.end(time.time(), None if finished else "the request ended unfinished")

    async def health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """SERVING or NOT_SERVING, from the engine's own health check."""
        try:
            health = self._engine.health()
        except Exception as error:  # noqa: BLE001 - a failing check is an unhealthy engine
            health = EngineHealth(False, f"health check failed: {error!r}")
        return convert.encode_health(health)

    async def load(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The engine's current load, with the requests this service received."""
        load = dataclasses.replace(self._engine.load(), num_requests_received=self._num_requests_received,
                                   num_spans_dropped=self._tracing.num_dropped if self._tracing else 0)
        return convert.encode_load(load)

    async def info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The served model's name and context length."""
        return convert.encode_info(self._engine.model_name, self._engine.max_model_len, self._engine.weights)

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        """The method table to register on a grpc.aio server."""
        handlers = {}
        for method, function in ((convert.HEALTH, self.health), (convert.LOAD, self.load),
                                 (convert.INFO, self.info)):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                function, request_deserializer=method.request_deserializer,
                response_serializer=method.response_serializer)
        session = convert.SESSION
        handlers[session.name] = grpc.stream_stream_rpc_method_handler(
            self.session, request_deserializer=session.request_deserializer,
            response_serializer=session.response_serializer)
        return grpc.method_handlers_generic_handler(convert.SERVICE_NAME, handlers)


class _Outbox:
    """What one Session call has to send: chunks and errors since its last message."""

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.started: set[str] = set()
        """Requests in flight that have sent output (their handover resumes rather than reruns)."""
        self._chunks: list[tuple[str, Any]] = []
        self._errors: list[tuple[str, int, str]] = []

    def __bool__(self) -> bool:
        return bool(self._chunks or self._errors)

    def put(self, request_id: str, chunk: Any) -> None:
        self.started.add(request_id)
        self._chunks.append((request_id, chunk))
        self.ready.set()

    def fail(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        self._errors.append((request_id, code.value[0], message))
        self.ready.set()

    def wake(self) -> None:
        """Have the session look at its state again (a request or the reader finished)."""
        self.ready.set()

    def take(self) -> Any:
        """One SessionResponse with everything waiting; empties the outbox."""
        message = convert.encode_session_response(self._chunks, self._errors)
        self._chunks, self._errors = [], []
        return message


def _finished(runs: dict[str, asyncio.Task], request_id: str, outbox: _Outbox, run: asyncio.Task) -> None:
    if runs.get(request_id) is run:
        del runs[request_id]
        outbox.started.discard(request_id)
    outbox.wake()


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


class ListenError(RuntimeError):
    """The server could not bind its address (taken, or not an address of this machine)."""


class ReplicaServer:
    """A grpc.aio server serving one engine on HOST:PORT (port 0 picks a free one)."""

    def __init__(self, engine: EngineClient, host: str = "127.0.0.1", port: int = 0, *,
                 secret: str | None = None, tracing=None) -> None:
        """secret: serve only calls that carry it (rpc/auth.py); None serves every call.
        tracing: a `scalellm.tracing` Tracing to record each request's spans with; None: off."""
        self.engine = engine
        self.tracing = tracing
        self.host = host
        self.port = port
        self._server: grpc.aio.Server | None = None
        self._service: ReplicaService | None = None
        self.secret_check = SecretCheck(secret) if secret is not None else None

    @property
    def address(self) -> str:
        """HOST:PORT clients connect to (valid after `start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving (the engine must already be started). Raises ListenError if the port is taken."""
        interceptors = (self.secret_check,) if self.secret_check is not None else ()
        server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self._service = ReplicaService(self.engine, self.tracing)
        server.add_generic_rpc_handlers((self._service.rpc_handler(),))
        try:
            self.port = server.add_insecure_port(self.address)
        except RuntimeError as error:
            raise ListenError(f"cannot listen on {self.address}: {error}") from error
        await server.start()
        self._server = server

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Refuse new requests and hand over those with no output yet; let the running ones finish for
        up to `grace_s`, then hand them over too (see the module docstring) and close the calls."""
        if self._server is not None:
            self._service.stop_admitting()
            if grace_s and not await self._service.wait_idle(grace_s):
                handed = self._service.hand_over(running=True)
                logger.info("handed %d running requests over to the other replicas", handed)
            await self._server.stop(1.0 if grace_s else grace_s)
            self._server = None


async def serve_until_signal(engine: EngineClient, host: str, port: int, grace_s: float = 5.0, *,
                             secret: str | None = None, tracing=None,
                             on_engine_started: Callable[[], None] | None = None) -> None:
    """Start the engine (then call `on_engine_started`) and the server, serve until SIGTERM or SIGINT,
    then stop both (and `tracing`, exporting its last spans)."""
    await engine.start()
    if on_engine_started is not None:
        on_engine_started()
    server = ReplicaServer(engine, host, port, secret=secret, tracing=tracing)
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
        if tracing is not None:
            await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
