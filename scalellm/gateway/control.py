"""The supervisor's private control channel to its gateway child: JSON lines on the gateway's stdin.

    line 1    the GatewayConfig, as a JSON object
    line 2..  replica-set updates: {"replicas": ["127.0.0.1:41001", ...], "shape": "2x1", "reason": "..."}

The supervisor sends an update with the initial set right after the config, and one per shape
change; a restarted gateway gets the config and the latest update again. The gateway applies each
update at once: new requests go to the new replicas, requests in flight on the old ones finish
there, and the old clients close when their last request has (`ReplicaSetFollower`). End of input
(the supervisor closed the pipe) just ends the following.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from scalellm.shape.shape import Shape

logger = logging.getLogger("scalellm.gateway.shape")

IDLE_POLL_S = 0.05


@dataclass(frozen=True)
class ReplicaSetUpdate:
    """The replicas the gateway routes to from now on, and the shape they make."""

    addresses: tuple[str, ...]
    shape: Shape
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))
        if not self.addresses or any(":" not in address for address in self.addresses):
            raise ValueError(f"an update needs HOST:PORT replica addresses, got {list(self.addresses)}")

    def encode(self) -> bytes:
        """One JSON line."""
        return json.dumps({"replicas": list(self.addresses), "shape": self.shape.label,
                           "reason": self.reason}).encode() + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> "ReplicaSetUpdate":
        """Parse one line; ValueError when it is not an update."""
        try:
            fields = json.loads(line)
            return cls(tuple(fields["replicas"]), Shape.parse(fields["shape"]), str(fields.get("reason", "")))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"not a replica-set update: {error}") from None


class ReplicaSetFollower:
    """Applies updates to a running gateway's router and metrics (the gateway side of the channel)."""

    def __init__(self, app, make_client: Callable[[str], object] | None = None) -> None:
        from scalellm.gateway.app import default_client_factory

        self.app = app
        self.make_client = make_client or default_client_factory(app.config)
        self._closing: set[asyncio.Task] = set()

    def apply(self, update: ReplicaSetUpdate) -> None:
        """Route new requests to the update's replicas; retire the others once they are idle."""
        retired = self.app.router.replace_replicas(update.addresses, self.make_client)
        changed = self.app.metrics.set_shape(update.shape.replicas, update.shape.parallel)
        if changed or retired:
            logger.info("replica set now %s: %s%s", update.shape.label, ", ".join(update.addresses),
                        f" ({update.reason})" if update.reason else "")
        for state in retired:
            task = asyncio.get_running_loop().create_task(self._close_when_idle(state))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def follow(self, reader: asyncio.StreamReader) -> None:
        """Apply every update line until end of input; a malformed line is logged and skipped."""
        while line := await reader.readline():
            try:
                self.apply(ReplicaSetUpdate.decode(line))
            except ValueError as error:
                logger.error("control channel: %s", error)

    async def wait_closed(self) -> None:
        """Until every retired replica's client is closed (for tests and shutdown)."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _close_when_idle(self, state) -> None:
        while state.num_requests_in_flight > 0:
            await asyncio.sleep(IDLE_POLL_S)
        await state.client.close()
        self.app.metrics.forget_replica(state.address)


async def stdin_reader() -> asyncio.StreamReader:
    """An asyncio reader over this process's stdin (a pipe from the supervisor)."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve_supervised_gateway() -> None:
    """The gateway child: its config from the first stdin line, then updates from the following ones."""
    from scalellm.gateway.app import serve_until_signalled
    from scalellm.gateway.config import GatewayConfig

    reader = await stdin_reader()
    config = GatewayConfig(**json.loads(await reader.readline()))
    tasks: list[asyncio.Task] = []

    def on_started(app) -> None:
        tasks.append(asyncio.get_running_loop().create_task(ReplicaSetFollower(app).follow(reader)))

    await serve_until_signalled(config, on_started=on_started)
    for task in tasks:
        task.cancel()


def run_supervised_gateway() -> None:
    """Entry point of the gateway child of `scalellm serve` (blocking; uvloop)."""
    from scalellm.gateway.app import run_gateway_process

    run_gateway_process(serve_supervised_gateway())
