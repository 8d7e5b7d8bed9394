"""The ReplicaLauncher interface: how `scalellm serve` gets the replicas of a shape, wherever they run.

    replica_set = launcher.build(shape)     not started yet
    replica_set.start()                     start every replica
    await replica_set.wait_healthy(...)     until each reports its address and answers Health;
                                            returns the model's name
    replica_set.addresses                   the replicas' gRPC HOST:PORT as they are now, what the
                                            gateway routes to
    replica_set.check_restart(now)          start again the replicas that died (with backoff); True
                                            when that changed `addresses` (the gateway must be told)
    await replica_set.drain(timeout_s)      until no replica has a request running or waiting
    replica_set.stop(timeout_s)             stop them all (request_stop() only asks, without waiting)

Waiting for health and draining talk to the replicas over gRPC, so they are the same for every
launcher; starting, restarting and stopping are the launcher's own. A replica's address may be
known only once it started (a Ray actor picks a port on whatever node it was placed on) and may
change when it is restarted elsewhere: `wait_addresses` waits for them, `check_restart` says when
they changed. Implementations: LocalLauncher (processes on this machine, deploy/local.py) and
RayLauncher (Ray actors on a cluster's nodes, deploy/ray.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from typing import Callable, Sequence

from scalellm.process import POLL_INTERVAL_S, StartupError
from scalellm.shape.shape import Shape

logger = logging.getLogger("scalellm.supervisor")

REPLICA_STOP_TIMEOUT_S = 15.0
"""How long a replica may take to stop after SIGTERM before it is killed."""
IDLE_CONFIRMATIONS = 2
"""Consecutive idle Load polls (with no new request received) before a drained replica counts as idle."""
DRAIN_POLL_S = 0.25


class ReplicaSet(ABC):
    """The replicas of one shape, each serving the Replica gRPC service at one of `addresses`."""

    def __init__(self, shape: Shape, names: Sequence[str], secret: str | None = None) -> None:
        """secret: what the replicas require of every call (scalellm/rpc/auth.py), None for nothing."""
        if len(names) != shape.replicas:
            raise ValueError(f"a replica set of shape {shape.label} needs {shape.replicas} names")
        self.shape = shape
        self.names = list(names)
        self.secret = secret

    @property
    @abstractmethod
    def addresses(self) -> list[str]:
        """Every replica's gRPC HOST:PORT as it is now; complete once `wait_addresses` returned."""

    async def wait_addresses(self, deadline: float, should_stop: Callable[[], bool]) -> None:
        """Until every started replica has reported its address (at once where they are known at build).

        Raises StartupError when a replica fails first, `deadline` (monotonic) passes or `should_stop()`.
        """

    @abstractmethod
    def start(self) -> None:
        """Start every replica (returns at once; `wait_healthy` waits for them)."""

    @abstractmethod
    def startup_failure(self, index: int) -> str | None:
        """Why replica `index` can no longer come up (it exited), or None while it may."""

    @abstractmethod
    def check_restart(self, now: float) -> bool:
        """Start again (with backoff) the replicas that died; True when a replica's address changed."""

    @abstractmethod
    def request_stop(self) -> None:
        """Ask every replica to stop (they drain what they run); returns at once."""

    @abstractmethod
    def stop(self, timeout_s: float) -> None:
        """Stop every replica, forcing those not gone after `timeout_s`, and free what the set holds. Blocking."""

    async def wait_healthy(self, timeout_s: float,
                           should_stop: Callable[[], bool] = lambda: False) -> tuple[str, int, str]:
        """Wait until every replica answers Health as serving; returns the first one's Info: (model
        name, max_model_len, how it runs the weights).

        Raises StartupError when a replica exits, `timeout_s` passes or `should_stop()` turns true.
        """
        from scalellm.rpc.client import ReplicaClient, ReplicaError

        deadline = time.monotonic() + timeout_s
        await self.wait_addresses(deadline, should_stop)
        clients = [ReplicaClient(address, secret=self.secret) for address in self.addresses]
        try:
            for index, client in enumerate(clients):
                while True:
                    self._check_starting(index, deadline, timeout_s, should_stop)
                    try:
                        if (await client.health()).healthy:
                            break
                    except ReplicaError:
                        pass
                    await asyncio.sleep(POLL_INTERVAL_S)
                logger.info("%s ready", self.names[index])
            return await clients[0].info()
        finally:
            for client in clients:
                await client.close()

    def _check_starting(self, index: int, deadline: float, timeout_s: float, should_stop) -> None:
        if should_stop():
            raise StartupError("stopped during startup")
        failure = self.startup_failure(index)
        if failure is not None:
            raise StartupError(f"{self.names[index]} {failure} during startup")
        if time.monotonic() > deadline:
            raise StartupError(f"{self.names[index]} not ready after {timeout_s:.0f} s")

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no replica has a request running or waiting; False when `timeout_s` passed first.

        A replica counts as idle after IDLE_CONFIRMATIONS polls in a row that show nothing in flight
        and no new request received; one that cannot be reached has nothing left to finish.
        """
        from scalellm.rpc.client import ReplicaClient, ReplicaError

        deadline = time.monotonic() + timeout_s
        clients = [ReplicaClient(address, secret=self.secret) for address in self.addresses]
        idle_polls = [0] * len(clients)
        received: list[int | None] = [None] * len(clients)
        try:
            while min(idle_polls) < IDLE_CONFIRMATIONS:
                if time.monotonic() > deadline:
                    return False
                for index, client in enumerate(clients):
                    try:
                        load = await client.load()
                    except ReplicaError:
                        idle_polls[index] = IDLE_CONFIRMATIONS
                        continue
                    quiet = load.num_running + load.num_waiting == 0 and received[index] in (
                        None, load.num_requests_received)
                    idle_polls[index] = idle_polls[index] + 1 if quiet else 0
                    received[index] = load.num_requests_received
                await asyncio.sleep(DRAIN_POLL_S)
            return True
        finally:
            for client in clients:
                await client.close()


class ReplicaLauncher(ABC):
    """Builds the replica set of any shape; where and how its replicas run is the implementation's."""

    secret: str | None = None
    """The deployment's secret its replicas require of every call (None: they serve any caller)."""

    @abstractmethod
    def build(self, shape: Shape) -> ReplicaSet:
        """The (not yet started) replica set of `shape`. ValueError when this launcher cannot run it."""

    def close(self) -> None:
        """Free what the launcher holds beyond its sets (a cluster connection), after they stopped."""
