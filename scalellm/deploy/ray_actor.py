"""The Ray actor that holds one replica on whatever node Ray placed it (deploy/ray.py creates it).

    address = await actor.start.remote()     the replica process runs and listens: "NODE_IP:PORT"
    code = await actor.wait_exit.remote()    returns when the replica process exited (its exit code)
    actor.stop.remote(timeout_s)             SIGTERM, then SIGKILL after timeout_s

The actor owns a `scalellm replica --config-stdin` process (a ChildProcess, scalellm/process.py) that
listens on the node's own address, not on loopback, so the gateway on another node reaches it; the
config it is given carries the deployment's secret, which the replica then requires of every call.
The actor reserves the replica's CPUs (its threads times its tensor-parallel ranks, which the replica
starts on this same node). It is an asyncio actor: every method runs on the actor's one event-loop
thread, which lives as long as the actor, so the kernel's parent-death signal the replica asks for
(`die_with_parent`) arrives exactly when the actor process dies, as it does with its node.
Nothing here imports Ray: the class becomes an actor in deploy/ray.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

from scalellm.deploy.local import REPLICA_ARGV
from scalellm.flags import from_json, to_json
from scalellm.process import ChildProcess, free_ports
from scalellm.replica.config import ReplicaConfig

LISTEN_POLL_S = 0.1
EXIT_POLL_S = 0.2


class ReplicaHost:
    """One replica process on this node (see the module docstring)."""

    def __init__(self, name: str, config_json: str, extra_env: dict[str, str] | None = None) -> None:
        """config_json: the replica's ReplicaConfig (scalellm/flags.py `to_json`); host and port are set here."""
        self.name = name
        self.config = from_json(ReplicaConfig, config_json)
        self.extra_env = extra_env or {}
        self.child: ChildProcess | None = None

    async def start(self, timeout_s: float) -> str:
        """Start the replica on this node's address; return HOST:PORT once it accepts connections (its
        engine is built by then). RuntimeError when it exits or does not listen within `timeout_s`."""
        import ray

        host = ray.util.get_node_ip_address()
        config = dataclasses.replace(self.config, host=host, port=free_ports(1, host)[0])
        self.child = ChildProcess(f"{self.name} ({config.address})", REPLICA_ARGV,
                                  to_json(config).encode() + b"\n", extra_env=self.extra_env)
        self.child.start()
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(_accepts, host, config.port):
            code = self.child.poll()
            if code is not None:
                raise RuntimeError(f"{self.name} exited with code {code} before listening on {config.address}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {config.address} within {timeout_s:.0f} s")
            await asyncio.sleep(LISTEN_POLL_S)
        return config.address

    async def wait_exit(self) -> int:
        """Until the replica process exits; its exit code."""
        while self.child is None or self.child.poll() is None:
            await asyncio.sleep(EXIT_POLL_S)
        return self.child.poll()

    async def request_stop(self) -> None:
        """SIGTERM the replica (it finishes what it runs, then exits); returns at once."""
        import signal

        if self.child is not None:
            self.child.signal(signal.SIGTERM)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, wait up to `timeout_s`, SIGKILL what is left."""
        if self.child is not None:
            await asyncio.to_thread(self.child.stop, timeout_s)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False
