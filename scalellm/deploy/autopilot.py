"""The controller at work inside `scalellm serve --shape auto`: observe, decide, change shape.

Every `poll_interval_s` the autopilot reads the Load of the serving replicas, sums their running and
waiting requests and the requests they received since the last poll, and feeds that sample to the
`ShapeController`. A change it returns is carried out without dropping a request (the controller
decides nothing meanwhile):

    1. start the target shape's replicas (the launcher's build); wait until each answers Health
       (a replica that dies or misses the startup timeout aborts the change: the new set is
       stopped, the old one keeps serving)
    2. switch: the supervisor sends the gateway the new set; new requests go there from now on
    3. hand over: SIGTERM the old replicas; each ends its requests with no output yet at once and
       its running ones after its stop grace (rpc/server.py), and the gateway continues them on
       the new set (run again, or resumed after the delivered tokens: gateway/failover.py), so a
       change does not wait for the longest request; then wait until they are idle (bounded by
       `drain_timeout_s`) and stop them
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol, Sequence

from scalellm.deploy.launcher import REPLICA_STOP_TIMEOUT_S, ReplicaLauncher, ReplicaSet
from scalellm.process import StartupError
from scalellm.shape.controller import LoadSample, ShapeChange, ShapeController

logger = logging.getLogger("scalellm.shape")

SWITCH_GRACE_S = 1.0
"""After a switch, time for the gateway to apply it before the old replicas are watched for idleness."""


class ShapeHost(Protocol):
    """What the autopilot needs from the supervisor that owns the replica sets."""

    replica_set: ReplicaSet
    """The set serving now (its replicas are restarted if they die)."""

    def adopt(self, replica_set: ReplicaSet) -> None:
        """Keep `replica_set` in view for shutdown while it starts or drains."""

    def switch_to(self, replica_set: ReplicaSet, reason: str) -> ReplicaSet:
        """Make `replica_set` the serving set and tell the gateway; returns the previous set."""

    def release(self, replica_set: ReplicaSet) -> None:
        """Forget a stopped set."""

    def stopping(self) -> bool:
        """True once the supervisor was asked to stop."""


class LoadPoller:
    """Sums the Load of a changing set of replicas into `LoadSample`s (arrivals from counter deltas)."""

    def __init__(self, timeout_s: float = 1.0, secret: str | None = None) -> None:
        self.timeout_s = timeout_s
        self.secret = secret
        self._clients: dict = {}
        self._received: dict[str, int] = {}

    async def poll(self, addresses: Sequence[str]) -> LoadSample:
        """One sample over `addresses`; an unreachable replica adds nothing."""
        from scalellm.rpc.client import ReplicaClient, ReplicaError

        for address in set(self._clients) - set(addresses):
            await self._clients.pop(address).close()
            self._received.pop(address, None)
        running = waiting = arrived = 0
        for address in addresses:
            client = self._clients.get(address) or self._clients.setdefault(
                address, ReplicaClient(address, secret=self.secret))
            try:
                load = await client.load(timeout_s=self.timeout_s)
            except ReplicaError:
                continue
            running += load.num_running
            waiting += load.num_waiting
            before = self._received.get(address, 0)
            # A restarted replica counts from zero again.
            count = load.num_requests_received
            arrived += count - before if count >= before else count
            self._received[address] = count
        return LoadSample(running, waiting, arrived)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


class Autopilot:
    """Runs a `ShapeController` against the live replicas of a `ShapeHost` (see the module docstring)."""

    def __init__(self, controller: ShapeController, launcher: ReplicaLauncher, host: ShapeHost, *,
                 poll_interval_s: float = 1.0, startup_timeout_s: float = 600.0,
                 drain_timeout_s: float = 600.0) -> None:
        self.controller = controller
        self.launcher = launcher
        self.host = host
        self.poll_interval_s = poll_interval_s
        self.startup_timeout_s = startup_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.poller = LoadPoller(secret=launcher.secret)

    async def run(self) -> None:
        """Observe and act until cancelled."""
        try:
            while True:
                sample = await self.poller.poll(self.host.replica_set.addresses)
                change = self.controller.observe(time.monotonic(), sample)
                if change is not None:
                    await self.change_shape(change)
                await asyncio.sleep(self.poll_interval_s)
        finally:
            await self.poller.close()

    async def change_shape(self, change: ShapeChange) -> bool:
        """Carry out one change; returns whether the new shape serves now."""
        logger.info("shape change %s -> %s: %s", change.source.label, change.target.label, change.reason)
        started = time.monotonic()
        new_set = self.launcher.build(change.target)
        self.host.adopt(new_set)
        new_set.start()
        try:
            await new_set.wait_healthy(self.startup_timeout_s, self.host.stopping)
        except StartupError as error:
            log = logger.info if self.host.stopping() else logger.error
            log("shape change to %s abandoned, %s keeps serving: %s", change.target.label, change.source.label, error)
            await self._stop(new_set)
            self.controller.finish_change(time.monotonic(), ok=False)
            return False
        old_set = self.host.switch_to(new_set, change.reason)
        self.controller.finish_change(time.monotonic(), ok=True)
        await asyncio.sleep(SWITCH_GRACE_S)
        old_set.request_stop()
        drained = await old_set.drain(self.drain_timeout_s)
        if not drained:
            logger.warning("replicas of %s still busy after %.0f s; stopping them", old_set.shape.label,
                           self.drain_timeout_s)
        await self._stop(old_set)
        logger.info("shape %s serving; %s stopped (change took %.1f s)", change.target.label,
                    old_set.shape.label, time.monotonic() - started)
        return True

    async def _stop(self, replica_set: ReplicaSet) -> None:
        await asyncio.to_thread(replica_set.stop, REPLICA_STOP_TIMEOUT_S)
        self.host.release(replica_set)
