"""The gateway's client of one replica: one grpc.aio channel, reused by every call.

Errors reach the gateway as `ReplicaError` carrying the HTTP status to answer with; `ReplicaUnavailable`
means the replica could not be reached before any output arrived, so the request is safe to retry on
another replica. `abort_in_flight()` ends every call in flight with such an error: the health monitor
uses it when a replica stops answering with its connection still open (a hung or SIGSTOPped process),
which gRPC alone would only notice after its keepalive timeout.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from scalellm.protocol.types import EngineHealth, EngineLoad, PromptInput, RequestOutput, SamplingParams
from scalellm.replica import convert

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
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
    """Calls one replica's gRPC service (see proto/scalellm/v1/replica.proto) over one reused channel."""

    def __init__(self, address: str, *, connect_timeout_s: float = 2.0) -> None:
        self.address = address
        self._channel = grpc.aio.insecure_channel(address, options=_channel_options(connect_timeout_s))
        self._generate = self._channel.unary_stream(
            convert.GENERATE.path, request_serializer=convert.GENERATE.request_serializer,
            response_deserializer=convert.GENERATE.response_deserializer)
        self._unary = {method.name: self._channel.unary_unary(
            method.path, request_serializer=method.request_serializer,
            response_deserializer=method.response_deserializer)
            for method in (convert.HEALTH, convert.LOAD, convert.INFO)}
        self._calls: set = set()
        self._aborted: set = set()

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       gateway_receive_time: float, timeout_s: float | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Stream delta RequestOutputs; the last has finished=True and carries the stage timings.

        Raises ReplicaUnavailable when the replica is unreachable before the first output, ReplicaError
        otherwise (status 400 for input the replica rejects, 504 past `timeout_s`). Closing the iterator
        (or cancelling the task reading it) cancels the call, which aborts the request in the engine.
        """
        try:
            request = convert.encode_request(request_id, prompt, params, gateway_receive_time)
        except ValueError as error:
            raise ReplicaError(str(error), 400) from None
        call = self._generate(request, timeout=timeout_s)
        self._calls.add(call)
        received = False
        try:
            while True:
                try:
                    chunk = await call.read()
                except asyncio.CancelledError:
                    if call not in self._aborted:
                        raise
                    message = f"replica {self.address} stopped responding"
                    raise ReplicaUnavailable(message) if not received else ReplicaError(message, 503) from None
                if chunk is grpc.aio.EOF:
                    return
                received = True
                yield convert.decode_output(request_id, chunk)
        except grpc.aio.AioRpcError as error:
            raise self._error(error, retriable=not received) from None
        finally:
            call.cancel()
            self._calls.discard(call)
            self._aborted.discard(call)

    def abort_in_flight(self) -> int:
        """End every Generate call in flight with a ReplicaError (retriable if no output came yet).

        Returns how many calls were aborted; closing each cancels its request on the replica.
        """
        calls = list(self._calls)
        self._aborted.update(calls)
        for call in calls:
            call.cancel()
        return len(calls)

    async def health(self, timeout_s: float = 1.0) -> EngineHealth:
        """The replica engine's health; raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_health(await self._call(convert.HEALTH, timeout_s))

    async def load(self, timeout_s: float = 1.0) -> EngineLoad:
        """The replica engine's load; raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_load(await self._call(convert.LOAD, timeout_s))

    async def info(self, timeout_s: float = 2.0) -> tuple[str, int]:
        """(model_name, max_model_len); raises ReplicaUnavailable if the replica cannot be reached."""
        return convert.decode_info(await self._call(convert.INFO, timeout_s))

    async def close(self) -> None:
        """Close the channel, cancelling calls still in flight."""
        await self._channel.close()

    async def _call(self, method: convert.RpcMethod, timeout_s: float):
        try:
            return await self._unary[method.name](method.new_request(), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise self._error(error, retriable=True) from None

    def _error(self, error: grpc.aio.AioRpcError, retriable: bool) -> ReplicaError:
        code = error.code()
        message = f"replica {self.address}: {error.details() or code.name}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            message = error.details() or "the replica rejected the request"
        if retriable and code in _UNREACHABLE:
            return ReplicaUnavailable(message)
        return ReplicaError(message, _HTTP_STATUS.get(code, 500))


def _channel_options(connect_timeout_s: float) -> tuple[tuple[str, int], ...]:
    connect_timeout_ms = max(1, int(connect_timeout_s * 1000))
    return (
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # gRPC core uses the minimum reconnect backoff as the connection attempt's timeout.
        ("grpc.min_reconnect_backoff_ms", connect_timeout_ms),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),  # a restarted replica is found again within a second
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )
