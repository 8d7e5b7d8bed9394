"""`scalellm serve`: starts a replica set and the gateway, watches them, restarts the ones that die.

    supervisor ─┬─ replica set of a shape, from a ReplicaLauncher (scalellm/deploy/)
                └─ gateway     python -m scalellm.supervisor gateway  (control channel on its stdin)

The gateway reads its GatewayConfig from the first line of its stdin and replica-set updates from the
next lines (see scalellm/gateway/control.py); the pipe stays open, so with `--shape auto` an
`Autopilot` can replace the whole set at runtime: start the new one, `switch_to` it, drain and stop
the old one.

Startup: replicas first, each must answer Health (loading a model can take a while), then the gateway.
Shutdown (SIGINT/SIGTERM): SIGTERM to the gateway, which stops admitting and drains, then to the
replicas. Child processes and ports are scalellm/process.py's; this module only supervises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time

from scalellm.deploy.launcher import REPLICA_STOP_TIMEOUT_S, ReplicaLauncher, ReplicaSet
from scalellm.gateway.config import GatewayConfig
from scalellm.process import POLL_INTERVAL_S, ChildProcess, StartupError, check_port_free, check_starting
from scalellm.shape.shape import Shape

logger = logging.getLogger("scalellm.supervisor")


class Supervisor:
    """Runs the replicas and the gateway of one `scalellm serve` until a signal asks it to stop."""

    def __init__(self, launcher: ReplicaLauncher, shape: Shape, gateway_config: GatewayConfig, *,
                 startup_timeout_s: float = 600.0) -> None:
        """The replica set of `shape` is built at once; its addresses reach the gateway once its replicas
        reported them (a replica's address may be known only after it started)."""
        self.launcher = launcher
        self.replica_set = launcher.build(shape)
        self.gateway_config = gateway_config
        self.gateway = ChildProcess("gateway", [sys.executable, "-m", "scalellm.supervisor", "gateway"],
                                    None, keep_stdin_open=True)
        self.startup_timeout_s = startup_timeout_s
        self.autopilot = None
        """An `Autopilot` (scalellm.deploy) that changes the shape with the load, or None for a fixed shape."""
        self._other_sets: list[ReplicaSet] = []
        self._stop_requested = False

    def run(self) -> int:
        """Start everything, supervise until SIGINT/SIGTERM, stop everything; returns the exit code."""
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return asyncio.run(self._run())
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    async def _run(self) -> int:
        autopilot_task = None
        try:
            check_port_free(self.gateway_config.host, self.gateway_config.port)
            self.replica_set.start()
            model_name, _, weights = await self.replica_set.wait_healthy(self.startup_timeout_s, self.stopping)
            self.gateway.stdin_data = self._gateway_input("")
            self.gateway.start()
            await self._wait_for_gateway()
            config = self.gateway_config
            print(f"ScaleLLM serving {model_name} at {config.scheme}://{config.host}:{config.port} "
                  f"({self._describe()}; {weights})", flush=True)
            if self.autopilot is not None:
                autopilot_task = asyncio.get_running_loop().create_task(self.autopilot.run())
            while not self._stop_requested:
                now = time.monotonic()
                if self.replica_set.check_restart(now):
                    self._publish(self.replica_set, "a replica restarted at a new address")
                self.gateway.check_restart(now)
                await asyncio.sleep(POLL_INTERVAL_S)
            return 0
        except StartupError as error:
            if not self._stop_requested:
                logger.error("%s", error)
                return 1
            return 0
        finally:
            if autopilot_task is not None:
                autopilot_task.cancel()
                await asyncio.gather(autopilot_task, return_exceptions=True)

    def _describe(self) -> str:
        count = self.replica_set.shape.replicas
        text = f"{count} replica{'s' if count != 1 else ''}"
        return text + (f", shape auto, now {self.replica_set.shape.label}" if self.autopilot else "")

    def _request_stop(self, signum: int, frame) -> None:
        if not self._stop_requested:
            logger.info("received %s: draining and stopping", signal.Signals(signum).name)
        self._stop_requested = True

    def stopping(self) -> bool:
        """True once SIGINT or SIGTERM asked the supervisor to stop."""
        return self._stop_requested

    def _gateway_input(self, reason: str) -> bytes:
        """The gateway's stdin at (re)start: its config, then the serving replica set."""
        from scalellm.gateway.control import ReplicaSetUpdate

        addresses = tuple(self.replica_set.addresses)
        config = dataclasses.replace(self.gateway_config, replica_addresses=addresses,
                                     replica_secret=self.launcher.secret)
        update = ReplicaSetUpdate(addresses, self.replica_set.shape, reason)
        return json.dumps(dataclasses.asdict(config)).encode() + b"\n" + update.encode()

    def adopt(self, replica_set: ReplicaSet) -> None:
        """Keep a starting (or draining) replica set in view, so shutdown stops it too."""
        self._other_sets.append(replica_set)

    def switch_to(self, replica_set: ReplicaSet, reason: str) -> ReplicaSet:
        """Serve from `replica_set` (adopted, healthy) from now on; returns the previous set, now unsupervised."""
        previous, self.replica_set = self.replica_set, replica_set
        self._other_sets = [s for s in self._other_sets if s is not replica_set] + [previous]
        self._publish(replica_set, reason)
        return previous

    def _publish(self, replica_set: ReplicaSet, reason: str) -> None:
        """Tell the gateway to route to `replica_set`'s addresses as they are now (and a restarted gateway too)."""
        from scalellm.gateway.control import ReplicaSetUpdate

        self.gateway.stdin_data = self._gateway_input(reason)
        self.gateway.send(ReplicaSetUpdate(tuple(replica_set.addresses), replica_set.shape, reason).encode())

    def release(self, replica_set: ReplicaSet) -> None:
        """Forget a replica set that was stopped."""
        self._other_sets = [s for s in self._other_sets if s is not replica_set]

    async def _wait_for_gateway(self) -> None:
        host = self.gateway_config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        deadline = time.monotonic() + 60.0
        while True:
            check_starting(self.gateway, deadline, 60.0, self.stopping)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, self.gateway_config.port), 1.0)
                writer.close()
                return
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(POLL_INTERVAL_S)

    def _shutdown(self) -> None:
        """Gateway first (it drains in-flight requests), then every replica set."""
        self.gateway.stop(self.gateway_config.drain_timeout_s + 10.0)
        sets = [self.replica_set, *self._other_sets]
        for replica_set in sets:
            replica_set.request_stop()
        for replica_set in sets:
            replica_set.stop(REPLICA_STOP_TIMEOUT_S)
        self.launcher.close()


def _gateway_child_main() -> None:
    """Entry point of the gateway child: config and replica-set updates on stdin (scalellm/gateway/control.py)."""
    from scalellm.gateway.control import run_supervised_gateway
    from scalellm.process import die_with_parent

    die_with_parent()

    run_supervised_gateway()


if __name__ == "__main__":
    _gateway_child_main()
