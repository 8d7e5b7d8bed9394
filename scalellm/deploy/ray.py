"""RayLauncher: the replicas of a shape as Ray actors on the nodes of a Ray cluster.

    launcher = RayLauncher.connect(replica_config, "auto" | "HOST:PORT")   ValueError naming what to do
    replica_set = launcher.build(shape)      one placement group: a bundle per replica, spread over nodes

Each replica is a `ReplicaHost` actor (deploy/ray_actor.py) placed in its own bundle of the set's
placement group. A bundle holds the replica's whole CPU reservation (threads x tensor-parallel ranks;
on GPUs one CPU and its ranks' GPUs), and a bundle never spans nodes, so a tensor-parallel replica's
ranks share one node; the group's SPREAD strategy puts the replicas on different nodes where it can.
The actor starts the replica's gRPC server on its node's address and reports HOST:PORT, which is
what the gateway routes to.

Faults: Ray's own signal is the `wait_exit` call each actor has pending: it returns when the replica
process exits and fails when the actor or its node dies. Either way the replica is started again
(exponential backoff after repeated failures) in the same bundle, which Ray itself re-places on a
node that remains when the old one is gone; the new address reaches the gateway through
`check_restart`. Meanwhile the gateway's health checks have taken the dead replica out of routing.
The replicas always require the deployment's secret: they listen on node addresses.

Nothing is left behind: stopping kills the actors and removes the group, and should the process that
called `connect` die first, Ray ends the actors it owned and each replica process follows its actor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import time

from scalellm.deploy.launcher import ReplicaLauncher, ReplicaSet
from scalellm.flags import to_json
from scalellm.process import StartupError, restart_backoff
from scalellm.replica.config import ReplicaConfig
from scalellm.shape.shape import Machine, Shape

logger = logging.getLogger("scalellm.supervisor")

NAMESPACE = "scalellm"
PLACEMENT_TIMEOUT_S = 30.0
"""How long a new replica set's placement group may wait for free CPUs before startup fails."""
CONNECT_TIMEOUT_S = 5.0
INSTALL_HINT = "install it with `pip install 'scalellm[ray]'`"


def _ray():
    """The ray module; ValueError naming the fix when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--launcher ray needs the ray package: {INSTALL_HINT}") from None
    return ray


class _Replica:
    """The driver's view of one replica: its actor, its address and what is pending on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.actor = None
        self.address: str | None = None
        self.start_ref = None
        """Pending `start`: the address once the replica listens."""
        self.exit_ref = None
        """Pending `wait_exit`: ready when the replica process exited or the actor died."""
        self.started_at = 0.0
        self.num_failures = 0
        self.restart_at: float | None = None


class RayReplicaSet(ReplicaSet):
    """Replicas of one shape as actors in one placement group (see the module docstring)."""

    def __init__(self, shape: Shape, launcher: "RayLauncher", bundle: dict[str, float]) -> None:
        names = [f"replica {index} of {shape.label}" for index in range(shape.replicas)]
        super().__init__(shape, names, launcher.secret)
        self.launcher = launcher
        self.bundle = bundle
        self.replicas = [_Replica(name) for name in names]
        self.group = None
        """The placement group, from `start` until `stop`."""
        self._ray = _ray()

    @property
    def addresses(self) -> list[str]:
        return [replica.address or "" for replica in self.replicas]

    def start(self) -> None:
        """Ask Ray for the placement group and create every actor in its bundle (placed when CPUs are free)."""
        from ray.util.placement_group import placement_group

        self.group = placement_group([dict(self.bundle) for _ in self.replicas], strategy="SPREAD")
        for index in range(len(self.replicas)):
            self._start_actor(index)

    async def wait_addresses(self, deadline: float, should_stop) -> None:
        """Until the group is placed and every actor reported its replica's address."""
        await self._wait_placed(deadline, should_stop)
        for replica in self.replicas:
            while replica.address is None:
                if should_stop():
                    raise StartupError("stopped during startup")
                if time.monotonic() > deadline:
                    raise StartupError(f"{replica.name} did not start in time")
                ready, _ = self._ray.wait([replica.start_ref], timeout=0)
                if ready:
                    try:
                        self._started(replica, self._ray.get(replica.start_ref))
                    except Exception as error:  # the actor's error or its death
                        raise StartupError(f"{replica.name} failed to start: {_reason(error)}") from None
                else:
                    await asyncio.sleep(0.1)

    async def _wait_placed(self, deadline: float, should_stop) -> None:
        placed = self.group.ready()
        limit = min(deadline, time.monotonic() + PLACEMENT_TIMEOUT_S)
        while not self._ray.wait([placed], timeout=0)[0]:
            if should_stop():
                raise StartupError("stopped during startup")
            if time.monotonic() > limit:
                raise StartupError(self.launcher.shortage(self.shape, self.bundle))
            await asyncio.sleep(0.1)

    def startup_failure(self, index: int) -> str | None:
        replica = self.replicas[index]
        if replica.exit_ref is None or not self._ray.wait([replica.exit_ref], timeout=0)[0]:
            return None
        return self._exit_reason(replica)

    def check_restart(self, now: float) -> bool:
        """Restart replicas whose process exited or whose actor (or node) died; True when an address changed."""
        changed = False
        for index, replica in enumerate(self.replicas):
            if replica.start_ref is not None or replica.restart_at is not None:  # restarting
                changed |= self._advance_restart(index, replica, now)
            elif replica.exit_ref is not None and self._ray.wait([replica.exit_ref], timeout=0)[0]:
                self._schedule_restart(replica, now, self._exit_reason(replica))
        return changed

    def _schedule_restart(self, replica: _Replica, now: float, reason: str) -> None:
        delay, replica.num_failures = restart_backoff(replica.num_failures, replica.started_at, now)
        replica.restart_at = now + delay
        replica.exit_ref = None
        self._kill(replica)
        logger.warning("%s at %s %s; restarting in %.1f s", replica.name, replica.address, reason, delay)

    def _advance_restart(self, index: int, replica: _Replica, now: float) -> bool:
        """Start a scheduled restart when its time came; True once the new replica listens."""
        if replica.restart_at is not None:
            if now >= replica.restart_at:
                replica.restart_at = None
                self._start_actor(index)  # `addresses` keeps the old one until the new one listens
            return False
        if not self._ray.wait([replica.start_ref], timeout=0)[0]:
            return False
        try:
            address = self._ray.get(replica.start_ref)
        except Exception as error:
            self._schedule_restart(replica, now, f"failed to start again ({_reason(error)})")
            return False
        self._started(replica, address)
        logger.info("%s restarted at %s", replica.name, address)
        return True

    def _start_actor(self, index: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        replica = self.replicas[index]
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)
        options = {"num_cpus": self.bundle.get("CPU", 0), "num_gpus": self.bundle.get("GPU", 0),
                   "scheduling_strategy": strategy, "max_restarts": 0, "namespace": NAMESPACE}
        replica.actor = self.launcher.actor_class.options(**options).remote(
            replica.name, to_json(self.launcher.replica_config(self.shape)))
        replica.start_ref = replica.actor.start.remote(self.launcher.listen_timeout_s)
        replica.started_at = time.monotonic()

    def _started(self, replica: _Replica, address: str) -> None:
        replica.address = address
        replica.start_ref = None
        replica.exit_ref = replica.actor.wait_exit.remote()

    def _exit_reason(self, replica: _Replica) -> str:
        try:
            return f"exited with code {self._ray.get(replica.exit_ref)}"
        except Exception as error:
            return f"was lost ({_reason(error)})"

    def request_stop(self) -> None:
        for replica in self.replicas:
            if replica.actor is not None:
                replica.actor.request_stop.remote()

    def stop(self, timeout_s: float) -> None:
        """Stop every replica process (SIGKILL after `timeout_s`), kill the actors, remove the group."""
        from ray.util.placement_group import remove_placement_group

        stops = [replica.actor.stop.remote(timeout_s) for replica in self.replicas if replica.actor is not None]
        try:
            self._ray.wait(stops, num_returns=len(stops), timeout=timeout_s + 5.0)
        except Exception:  # noqa: BLE001 - a dead actor has nothing left to stop
            pass
        for replica in self.replicas:
            self._kill(replica)
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None

    def _kill(self, replica: _Replica) -> None:
        if replica.actor is not None:
            try:
                self._ray.kill(replica.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            replica.actor = None


class RayLauncher(ReplicaLauncher):
    """Starts replica sets on a Ray cluster this process is connected to (`connect`)."""

    def __init__(self, replica: ReplicaConfig, machine: Machine, *, listen_timeout_s: float = 600.0) -> None:
        """replica: every replica's config (its host and port are set on its node); a secret is made
        for the deployment when it has none. machine: the device kind and the parallelism unit."""
        ray = _ray()
        if replica.secret is None:
            replica = dataclasses.replace(replica, secret=secrets.token_urlsafe(32))
        self.replica = replica
        self.machine = machine
        self.secret = replica.secret
        self.listen_timeout_s = listen_timeout_s
        from scalellm.deploy.ray_actor import ReplicaHost

        self.actor_class = ray.remote(ReplicaHost)

    @staticmethod
    def connect(address: str | None = None) -> Machine:
        """Join the cluster at `address` (None or "auto": the one `ray start` runs on this machine) and
        return what it offers as a Machine (its CPUs, or GPUs when it has any). ValueError when no
        cluster can be reached, naming what to do."""
        ray = _ray()
        address = address or "auto"
        if address != "auto":
            _check_reachable(address)
        if not ray.is_initialized():
            try:
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level=logging.WARNING, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = "no Ray cluster runs on this machine" if address == "auto" else \
                    f"cannot join the Ray cluster at {address} ({_reason(error)})"
                raise ValueError(f"{where}: start one with `ray start --head`, or name it with "
                                 "--ray-address HOST:PORT") from None
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) >= 1:
            return Machine("cuda", int(resources["GPU"]))
        return Machine("cpu", max(1, int(resources.get("CPU", 0))))

    def replica_config(self, shape: Shape) -> ReplicaConfig:
        """The config every replica of `shape` gets (its node sets host and port)."""
        return dataclasses.replace(self.replica, engine=self.machine.apply(shape, self.replica.engine))

    def bundle(self, shape: Shape) -> dict[str, float]:
        """What one replica of `shape` reserves on its node."""
        if self.machine.device == "cuda":
            return {"CPU": 1.0, "GPU": float(shape.parallel)}
        return {"CPU": float(shape.parallel * self.replica.engine.tensor_parallel_size)}

    def check_fits(self, shape: Shape) -> None:
        """ValueError naming the shortage when the cluster's free resources cannot hold `shape` now."""
        needed = self.bundle(shape)
        available = _ray().available_resources()
        if any(available.get(key, 0) < amount * shape.replicas for key, amount in needed.items()):
            raise ValueError(self.shortage(shape, needed))

    def shortage(self, shape: Shape, bundle: dict[str, float]) -> str:
        ray = _ray()
        free, total = ray.available_resources(), ray.cluster_resources()
        need = ", ".join(f"{amount * shape.replicas:g} {key}" for key, amount in bundle.items())
        have = ", ".join(f"{free.get(key, 0):g} of {total.get(key, 0):g} {key}" for key in bundle)
        return (f"the Ray cluster cannot place {shape.replicas} replicas of {shape.label} ({need}, "
                f"{', '.join(f'{v:g} {k}' for k, v in bundle.items())} on one node each); free now: {have}: "
                "ask for fewer replicas or threads (--replicas, --num-threads, --shape) or add nodes")

    def build(self, shape: Shape) -> RayReplicaSet:
        return RayReplicaSet(shape, self, self.bundle(shape))

    def close(self) -> None:
        ray = _ray()
        if ray.is_initialized():
            ray.shutdown()


def _check_reachable(address: str) -> None:
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ValueError(f"cannot reach the Ray cluster at {address} ({error.strerror or error}): is "
                         "`ray start --head` running there, and is the address HOST:PORT of its GCS "
                         "(port 6379 by default)?") from None


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
