"""LocalLauncher: the replicas of a shape as `scalellm replica` processes on this machine.

Each replica is a supervised ChildProcess with its own gRPC port (scalellm/process.py); it gets its
whole ReplicaConfig as one line of JSON on stdin, again at every restart. On a CPU,
the replicas of a set with more than one replica lend each other their cores (engine/core_board.py):
the launcher creates the set's board file, gives each replica its slot and the machine's core count
for steps taken alone, and removes the board when the set stops.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import tempfile
from typing import Sequence

from scalellm.deploy.launcher import ReplicaLauncher, ReplicaSet
from scalellm.flags import to_json
from scalellm.process import ChildProcess, free_ports
from scalellm.replica.config import ReplicaConfig
from scalellm.shape.shape import Machine, Shape

REPLICA_ARGV = [sys.executable, "-m", "scalellm.cli", "replica", "--config-stdin"]


class LocalReplicaSet(ReplicaSet):
    """Replica processes of this machine; `core_board` is the lending board they share, if any."""

    def __init__(self, shape: Shape, children: Sequence[ChildProcess], addresses: Sequence[str],
                 core_board: str | None = None, secret: str | None = None) -> None:
        super().__init__(shape, [child.name for child in children], secret)
        if len(addresses) != shape.replicas:
            raise ValueError(f"a replica set of shape {shape.label} needs {shape.replicas} addresses")
        self._addresses = list(addresses)
        self.children = list(children)
        self.core_board = core_board

    @property
    def addresses(self) -> list[str]:
        """Fixed at build: a replica restarts on its own port."""
        return list(self._addresses)

    def start(self) -> None:
        for child in self.children:
            child.start()

    def startup_failure(self, index: int) -> str | None:
        code = self.children[index].poll()
        return None if code is None else f"exited with code {code}"

    def check_restart(self, now: float) -> bool:
        for child in self.children:
            child.check_restart(now)
        return False

    def request_stop(self) -> None:
        for child in self.children:
            child.signal(signal.SIGTERM)

    def stop(self, timeout_s: float) -> None:
        """SIGTERM every replica at once, then wait for each (SIGKILL after `timeout_s`); remove the board."""
        self.request_stop()
        for child in self.children:
            child.stop(timeout_s)
        if self.core_board is not None:
            try:
                os.unlink(self.core_board)
            except FileNotFoundError:
                pass
            self.core_board = None


class LocalLauncher(ReplicaLauncher):
    """Starts replicas as child processes of this one, on free ports of `host`.

    Every replica gets `replica`'s config with its own port, the shape's parallelism (threads on a
    CPU, tensor-parallel GPUs with their own CUDA_VISIBLE_DEVICES) and, where lending applies, its
    slot on the set's core board.
    """

    def __init__(self, replica: ReplicaConfig, machine: Machine, host: str = "127.0.0.1", *,
                 lend_cores: bool = True) -> None:
        """host: the interface the replicas listen on (and the gateway connects to); with any but
        loopback, `replica` should carry the deployment's secret."""
        self.replica = replica
        self.machine = machine
        self.host = host
        self.lend_cores = lend_cores
        self.secret = replica.secret

    def build(self, shape: Shape) -> LocalReplicaSet:
        ports = free_ports(shape.replicas, self.host)
        board = self._create_board(shape)
        children, addresses = [], []
        for index, port in enumerate(ports):
            config = self.replica_config(shape, index, port, board)
            children.append(ChildProcess(f"replica {index} of {shape.label} ({config.address})", REPLICA_ARGV,
                                         to_json(config).encode() + b"\n",
                                         extra_env=self.machine.replica_env(shape, index)))
            addresses.append(config.address)
        return LocalReplicaSet(shape, children, addresses, board, self.secret)

    def replica_config(self, shape: Shape, index: int, port: int, board: str | None = None) -> ReplicaConfig:
        """The config of replica `index` of `shape`, listening on `port`."""
        engine = self.machine.apply(shape, self.replica.engine)
        if board is not None:
            engine = dataclasses.replace(engine, core_board=board, core_board_slot=index,
                                         threads_when_alone=self.machine.num_units)
        return dataclasses.replace(self.replica, engine=engine, host=self.host, port=port)

    def lends_cores(self, shape: Shape) -> bool:
        """Whether the replicas of `shape` lend each other their cores: several single-rank replicas
        of the real engine on a CPU that leave cores to borrow."""
        return (self.lend_cores and self.replica.mock is None and self.replica.engine.tensor_parallel_size == 1
                and self.machine.device == "cpu" and shape.replicas > 1 and shape.parallel < self.machine.num_units)

    def _create_board(self, shape: Shape) -> str | None:
        if not self.lends_cores(shape):
            return None
        from scalellm.engine.core_board import create_board

        fd, board = tempfile.mkstemp(prefix="scalellm-cores-")
        os.close(fd)
        create_board(board, shape.replicas)
        return board


def default_replica_count(num_cores: int | None = None) -> int:
    """One single-threaded replica per core (up to 4) on a CPU; one replica when a GPU is present.

    Measured on 2 cores: two 1-thread replicas serve twice the tokens/s of one 2-thread replica at 16
    and 64 concurrent requests, because OpenMP's barriers stall whenever the gateway or a client
    takes one of the cores; at one request they are even.
    """
    if os.path.exists("/dev/nvidiactl"):
        return 1
    cores = num_cores if num_cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(cores, 4))


def threads_per_replica(num_replicas: int, num_cores: int | None = None) -> int:
    """Torch threads for each of `num_replicas` replicas sharing this machine's cores: max(1, C // N)."""
    cores = num_cores if num_cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // num_replicas)
