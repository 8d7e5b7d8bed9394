"""The gateway's client of one replica: one grpc.aio channel, and on it one Session call that carries
every request in flight (see proto/scalellm/v1/replica.proto), opened again when it ends.

Errors reach the gateway as `ReplicaError` carrying the HTTP status to answer with; `ReplicaUnavailable`
means the replica could not be reached before any output arrived, so the request is safe to retry on
another replica. `abort_in_flight()` ends every request in flight with such an error: the health monitor
uses it when a replica stops answering with its connection still open (a hung or SIGSTOPped process),
which gRPC alone would only notice after its keepalive timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import AsyncIterator, Sequence

import grpc

from scalellm.protocol.types import (EngineHealth, EngineLoad, PromptInput, RequestOutput, ResumedSample,
                                     SamplingParams)
from scalellm.rpc import convert
from scalellm.rpc.channel import client_options, secret_metadata

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 502,  # the gateway was not given the replicas' secret
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Failures that mean "the replica is not there (any more)": retried elsewhere if no output arrived yet.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class ReplicaError(Exception):
    """A request failed at or on the way to a replica; `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 503) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class ReplicaUnavailable(ReplicaError):
    """The replica could not be reached (refused, reset, shutting down) before any output: retry elsewhere."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 503)


class ReplicaClient:
    """Calls one replica's gRPC service (see proto/scalellm/v1/replica.proto) over one reused channel.

    Requests travel on one Session call at a time (opened on first use, and again after it ends),
    so the replica can answer a whole engine step's chunks in one message.
    """

    def __init__(self, address: str, *, connect_timeout_s: float = 2.0, secret: str | None = None) -> None:
        """secret: the deployment's replica secret, sent with every call (see rpc/channel.py)."""
        self.address = address
        self._metadata = secret_metadata(secret)
        self._channel = grpc.aio.insecure_channel(address, options=client_options(connect_timeout_s))
        self._open_call = self._channel.stream_stream(
            convert.SESSION.path, request_serializer=convert.SESSION.request_serializer,
            response_deserializer=convert.SESSION.response_deserializer)
        self._unary = {method.name: self._channel.unary_unary(
            method.path, request_serializer=method.request_serializer,
            response_deserializer=method.response_deserializer)
            for method in (convert.HEALTH, convert.LOAD, convert.INFO)}
        self._session: _Session | None = None

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       gateway_receive_time: float, timeout_s: float | None = None,
                       resumed_samples: Sequence[ResumedSample] = (),
                       trace_context: dict[str, str] | None = None,
                       final_only: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream delta RequestOutputs; the last has finished=True and carries the stage timings.

        resumed_samples: continue a request another replica failed: only these samples run, each after
        its delivered output tokens (see GenerateRequest.resumed_samples); the outputs hold only what
        follows them, under the samples' own indices.
        trace_context: the W3C carrier of the gateway's span, when it traces the request.
        final_only: the replica sends one output, when the request finishes, with what the deltas would
        have carried (GenerateRequest.final_only): for non-streamed requests.

        Raises ReplicaUnavailable when the replica is unreachable before the first output, ReplicaError
        otherwise (status 400 for input the replica rejects, 504 past `timeout_s`). Closing the iterator
        (or cancelling the task reading it) before the last output aborts the request in the engine.
        """
        try:
            request = convert.encode_request(request_id, prompt, params, gateway_receive_time, resumed_samples,
                                             final_only)
        except ValueError as error:
            raise ReplicaError(str(error), 400) from None
        if trace_context:
            convert.set_trace_context(request, trace_context)
        session = self._current_session()
        inbox = session.register(request_id)
        deadline = None
        if timeout_s is not None:
            deadline = session.loop.call_later(timeout_s, inbox.put_nowait, _DEADLINE)
        received = finished = False
        try:
            session.send(request)
            while True:
                item = await inbox.get()
                if isinstance(item, _Failure):
                    raise self._failure(item, received)
                received = True
                output = convert.decode_output(request_id, item)
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if deadline is not None:
                deadline.cancel()
            session.unregister(request_id, cancel=not finished)

    def abort_in_flight(self) -> int:
        """End every request in flight with a ReplicaError (retriable if no output came yet).

        Returns how many were aborted; ending the Session call cancels them on the replica.
        """
        session = self._session
        if session is None:
            return 0
        return session.abort()

    async def health(self, timeout_s: float = 1.0) -> EngineHealth:
        """The replica engine's health; raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_health(await self._call(convert.HEALTH, timeout_s))

    async def load(self, timeout_s: float = 1.0) -> EngineLoad:
        """The replica engine's load; raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_load(await self._call(convert.LOAD, timeout_s))

    async def info(self, timeout_s: float = 2.0) -> tuple[str, int, str]:
        """(model_name, max_model_len, weights); raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_info(await self._call(convert.INFO, timeout_s))

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        await self._channel.close()

    def _current_session(self) -> _Session:
        if self._session is None or self._session.ended:
            self._session = _Session(self._open_call(metadata=self._metadata))
        return self._session

    def _failure(self, item: object, received: bool) -> ReplicaError:
        """The error to raise for a request whose inbox got `item` instead of a chunk."""
        if item is _DEADLINE:
            return ReplicaError(f"replica {self.address}: deadline exceeded", 504)
        if isinstance(item, _RequestError):
            code = _STATUS_BY_NUMBER.get(item.code, grpc.StatusCode.UNKNOWN)
            return self._status_error(code, item.message, retriable=not received)
        error = item.error  # _SessionEnded
        if isinstance(error, grpc.aio.AioRpcError) and not item.aborted and error.code() in _HTTP_STATUS:
            return self._error(error, retriable=not received)
        # Any other status (UNKNOWN "Stream removed", INTERNAL "RST_STREAM" when the replica was killed)
        # is the connection lost, as when the call just ends: not this request's fault.
        message = f"replica {self.address} stopped responding" if item.aborted else \
            f"replica {self.address} ended the session" + (f": {error.details()}" if error is not None else "")
        return ReplicaUnavailable(message) if not received else ReplicaError(message, 503)

    async def _call(self, method: convert.RpcMethod, timeout_s: float):
        try:
            return await self._unary[method.name](method.new_request(), timeout=timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise self._error(error, retriable=True) from None

    def _error(self, error: grpc.aio.AioRpcError, retriable: bool) -> ReplicaError:
        return self._status_error(error.code(), error.details(), retriable)

    def _status_error(self, code: grpc.StatusCode, details: str | None, retriable: bool) -> ReplicaError:
        """The ReplicaError for a call or request the replica ended with gRPC status `code`."""
        message = f"replica {self.address}: {details or code.name}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            message = details or "the replica rejected the request"
        if retriable and code in _UNREACHABLE:
            return ReplicaUnavailable(message)
        return ReplicaError(message, _HTTP_STATUS.get(code, 500))


class _Failure:
    """What a request's inbox holds instead of a GenerateChunk (which it holds as is) when it failed."""

    __slots__ = ()


class _RequestError(_Failure):
    """The replica ended one request with a gRPC status."""

    __slots__ = ("code", "message")

    def __init__(self, code: int, message: str) -> None:
        self.code, self.message = code, message


class _SessionEnded(_Failure):
    """The Session call ended with the request unfinished (error: the call's AioRpcError, if any)."""

    __slots__ = ("error", "aborted")

    def __init__(self, error: BaseException | None, aborted: bool) -> None:
        self.error, self.aborted = error, aborted


def _messages(items: list) -> list:
    """The SessionRequests for queued items (GenerateRequests and cancellation SessionRequests), in
    order, each run of GenerateRequests in one message."""
    messages, run = [], []
    for item in items:
        if convert.is_generate_request(item):
            run.append(item)
            continue
        if run:
            messages.append(convert.session_generate_many(run))
            run = []
        messages.append(item)
    if run:
        messages.append(convert.session_generate_many(run))
    return messages


_DEADLINE = _Failure()
"""Put in a request's inbox when its timeout expires."""

_STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class _Inbox:
    """Items in order, for one consumer task: a request's from the Session reader, or the Session
    writer's. An asyncio.Queue without what this use never needs (bounds, putters, join): each item
    costs an append and, when the consumer is waiting, one future's result."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque = deque()
        self._loop = loop
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # a cancelled get leaves its future behind
                waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        return self._items.popleft()

    async def get_all(self) -> list:
        """Every item queued, once there is at least one."""
        while not self._items:
            self._waiter = self._loop.create_future()
            await self._waiter
        items = list(self._items)
        self._items.clear()
        return items


class _Session:
    """One Session call: sends requests and cancellations, and sorts the replica's messages into the
    inboxes of the requests in flight. When the call ends, every request still registered gets a
    _SessionEnded; the client then opens a new call for the next request.

    Messages are written by the session's own task, never by a request's: cancelling a request's
    task in the middle of a write would otherwise cancel the whole call, and every request on it.
    The requests that queue up while a write is in flight go out together in the next message
    (SessionRequest.more_generates): one gRPC write per batch instead of one per request.
    """

    def __init__(self, call) -> None:
        self.call = call
        self.ended = False
        self._aborted = False
        self._inboxes: dict[str, _Inbox] = {}
        self.loop = loop = asyncio.get_running_loop()
        self._outgoing = _Inbox(loop)
        self._reader = loop.create_task(self._read())
        self._writer = loop.create_task(self._write())

    def register(self, request_id: str) -> _Inbox:
        """A new request's inbox (already holding _SessionEnded if the call is over)."""
        inbox = _Inbox(self.loop)
        if self.ended:
            inbox.put_nowait(_SessionEnded(None, self._aborted))
        self._inboxes[request_id] = inbox
        return inbox

    def unregister(self, request_id: str, cancel: bool) -> None:
        """Forget the request; with `cancel`, tell the replica to abort it."""
        self._inboxes.pop(request_id, None)
        if cancel and not self.ended:
            self._outgoing.put_nowait(convert.session_cancel(request_id))

    def send(self, request) -> None:
        """Queue one GenerateRequest to start; if writing fails the call ends (the requests get _SessionEnded)."""
        self._outgoing.put_nowait(request)

    def abort(self) -> int:
        """End the call (a hung replica): every request in flight fails with "stopped responding"."""
        self._aborted = True
        self.ended = True  # new requests open a new call
        count = len(self._inboxes)
        self.call.cancel()
        return count

    async def _write(self) -> None:
        try:
            outgoing = self._outgoing
            while True:
                for message in _messages(await outgoing.get_all()):
                    await self.call.write(message)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            self.call.cancel()  # the reader then ends every request still registered
        except asyncio.CancelledError:
            if not self.call.cancelled():  # this task was cancelled, not the call
                raise

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                inboxes = self._inboxes
                for request_id, chunk in convert.session_chunks(response):
                    inbox = inboxes.get(request_id)
                    if inbox is not None:
                        inbox.put_nowait(chunk)
                for request_id, code, message in convert.session_errors(response):
                    inbox = inboxes.get(request_id)
                    if inbox is not None:
                        inbox.put_nowait(_RequestError(code, message))
        except grpc.aio.AioRpcError as rpc_error:
            error = rpc_error
        except asyncio.CancelledError:
            error = None  # the call was cancelled (abort, or the channel closed)
        finally:
            self.ended = True
            self._writer.cancel()
            for inbox in self._inboxes.values():
                inbox.put_nowait(_SessionEnded(error, self._aborted))
