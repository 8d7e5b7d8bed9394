"""How the replica client names a request's failure when its Session call ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from scalellm.rpc.client import ReplicaClient, ReplicaError, ReplicaUnavailable, _SessionEnded


def failure(code: grpc.StatusCode, received: bool) -> ReplicaError:
    async def main():
        client = ReplicaClient("127.0.0.1:1")
        try:
            error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="detail")
            return client._failure(_SessionEnded(error, aborted=False), received)
        finally:
            await client.close()
    return asyncio.run(main())


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE])
def test_a_lost_session_is_retriable_until_output_arrived(code):
    """A killed replica's call can end UNKNOWN ("Stream removed") or INTERNAL as well as UNAVAILABLE:
    before any output the request may run elsewhere; after it, a 503."""
    before = failure(code, received=False)
    assert isinstance(before, ReplicaUnavailable)
    after = failure(code, received=True)
    assert not isinstance(after, ReplicaUnavailable) and after.status_code == 503


def test_statuses_that_mean_something_keep_their_meaning():
    assert failure(grpc.StatusCode.INVALID_ARGUMENT, received=False).status_code == 400
    refused = failure(grpc.StatusCode.UNAUTHENTICATED, received=False)
    assert refused.status_code == 502 and not isinstance(refused, ReplicaUnavailable)
    assert failure(grpc.StatusCode.DEADLINE_EXCEEDED, received=True).status_code == 504
