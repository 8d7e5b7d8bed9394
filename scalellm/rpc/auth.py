"""The replica's side of the deployment secret: calls without it are refused, and counted.

Every call must carry the secret under SECRET_METADATA_KEY (rpc/channel.py); the value is compared
with `hmac.compare_digest`, so the time taken tells nothing about how much of it was right. A call
without it ends with UNAUTHENTICATED before any handler runs, whatever the method.
"""

from __future__ import annotations

import hmac
import logging
from typing import Awaitable, Callable

import grpc

from scalellm.rpc.channel import SECRET_METADATA_KEY

logger = logging.getLogger(__name__)

REFUSAL = "this replica serves only its deployment's gateway: the call lacks the deployment's secret"


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses calls whose metadata lacks `secret`; `num_refused` counts them."""

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a replica secret must not be empty")
        self._secret = secret.encode()
        self.num_refused = 0

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or self._carries_secret(details.invocation_metadata or ()):
            return handler
        self.num_refused += 1
        logger.warning("refused call %s without the deployment secret (%d so far)", details.method, self.num_refused)
        return _refusing(handler)

    def _carries_secret(self, metadata) -> bool:
        given = next((value for key, value in metadata if key == SECRET_METADATA_KEY), "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._secret)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends every call with UNAUTHENTICATED."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        async def refuse_stream(requests, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
            yield  # an async generator, as the method's own handler is

        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
