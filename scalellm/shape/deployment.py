"""Replica sets: the replica processes of one shape, started, health-checked, drained and stopped.

A shape change runs two sets side by side for a while (cores are oversubscribed briefly; memory
holds both): the new set starts on fresh ports and must answer Health before it gets traffic, and
the old set stops only once its replicas report nothing running or waiting.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from typing import Callable, Sequence

from scalellm.shape.shape import Machine, Shape
from scalellm.supervisor import POLL_INTERVAL_S, ChildProcess, check_starting, free_ports

logger = logging.getLogger("scalellm.supervisor")

IDLE_CONFIRMATIONS = 2
"""Consecutive idle Load polls (with no new request received) before a drained replica counts as idle."""
DRAIN_POLL_S = 0.25


class ReplicaSet:
    """The replicas of one shape, each a supervised child process with its own gRPC port."""

    def __init__(self, shape: Shape, children: Sequence[ChildProcess], addresses: Sequence[str]) -> None:
        if len(children) != len(addresses):
            raise ValueError("a replica set needs one address per replica process")
        self.shape = shape
        self.children = list(children)
        self.addresses = list(addresses)

    def start(self) -> None:
        """Spawn every replica process."""
        for child in self.children:
            child.start()

    def check_restart(self, now: float) -> None:
        """Restart (with backoff) the replicas that died."""
        for child in self.children:
            child.check_restart(now)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every replica at once, then wait for each (SIGKILL after `timeout_s`). Blocking."""
        for child in self.children:
            child.signal(signal.SIGTERM)
        for child in self.children:
            child.stop(timeout_s)

    async def wait_healthy(self, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> str:
        """Wait until every replica answers Health as serving; returns the served model's name.

        Raises StartupError when a replica exits, `timeout_s` passes or `should_stop()` turns true.
        """
        from scalellm.rpc.client import ReplicaClient, ReplicaError

        deadline = time.monotonic() + timeout_s
        clients = [ReplicaClient(address) for address in self.addresses]
        try:
            for child, client in zip(self.children, clients):
                while True:
                    check_starting(child, deadline, timeout_s, should_stop)
                    try:
                        if (await client.health()).healthy:
                            break
                    except ReplicaError:
                        pass
                    await asyncio.sleep(POLL_INTERVAL_S)
                logger.info("%s ready", child.name)
            model_name, _ = await clients[0].info()
            return model_name
        finally:
            for client in clients:
                await client.close()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until no replica has a request running or waiting; False when `timeout_s` passed first.

        A replica counts as idle after IDLE_CONFIRMATIONS polls in a row that show nothing in flight
        and no new request received; one that cannot be reached has nothing left to finish.
        """
        from scalellm.rpc.client import ReplicaClient, ReplicaError

        deadline = time.monotonic() + timeout_s
        clients = [ReplicaClient(address) for address in self.addresses]
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


class ReplicaLauncher:
    """Builds the (not yet started) replica set of any shape from the engine's command-line flags."""

    def __init__(self, engine_argv: Sequence[str], machine: Machine, host: str = "127.0.0.1") -> None:
        self.engine_argv = list(engine_argv)
        self.machine = machine
        self.host = host

    def build(self, shape: Shape) -> ReplicaSet:
        """One `scalellm replica` process per replica of `shape`, on free ports, with the shape's parallelism."""
        addresses = [f"{self.host}:{port}" for port in free_ports(shape.replicas, self.host)]
        children = []
        for index, address in enumerate(addresses):
            argv = [sys.executable, "-m", "scalellm.cli", "replica", *self.engine_argv,
                    *self.machine.replica_flags(shape), "--host", self.host, "--port", address.rsplit(":", 1)[1]]
            children.append(ChildProcess(f"replica {index} of {shape.label} ({address})", argv,
                                         extra_env=self.machine.replica_env(shape, index)))
        return ReplicaSet(shape, children, addresses)
