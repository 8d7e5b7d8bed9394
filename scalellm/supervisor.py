"""`scalellm serve`: starts N replicas and the gateway, watches them, restarts the ones that die.

    supervisor ─┬─ replica 0   python -m scalellm.cli replica ... --port P0   (own process group)
                ├─ replica N-1 python -m scalellm.cli replica ... --port PN-1
                └─ gateway     python -m scalellm.supervisor gateway  (GatewayConfig as JSON on stdin)

Startup: replicas first, each must answer Health (loading a model can take a while), then the gateway.
Shutdown (SIGINT/SIGTERM): SIGTERM to the gateway, which stops admitting and drains, then to the
replicas. Children run in their own process groups (a terminal's Ctrl-C reaches only the supervisor)
and ask the kernel for SIGTERM should the supervisor die (see `die_with_parent`), so none is orphaned.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from scalellm import env
from scalellm.gateway.config import GatewayConfig

logger = logging.getLogger("scalellm.supervisor")

POLL_INTERVAL_S = 0.2
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before dying restarts without backoff."""
REPLICA_STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


class ChildProcess:
    """One supervised subprocess in its own process group, restarted with exponential backoff."""

    def __init__(self, name: str, argv: list[str], stdin_data: bytes | None = None) -> None:
        self.name = name
        self.argv = argv
        self.stdin_data = stdin_data
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.num_failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        """Spawn the process (stdout and stderr are inherited)."""
        child_env = {**os.environ, env.PARENT_PID_VAR: str(os.getpid())}
        self.process = subprocess.Popen(
            self.argv, env=child_env, start_new_session=True,
            stdin=subprocess.PIPE if self.stdin_data is not None else subprocess.DEVNULL)
        if self.stdin_data is not None:
            self.process.stdin.write(self.stdin_data)
            self.process.stdin.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return None if self.process is None else self.process.poll()

    def check_restart(self, now: float) -> None:
        """If the process died, schedule its restart with backoff; start it when the time has come."""
        code = self.poll()
        if code is None or self.process is None:
            return
        if self.restart_at is None:
            if now - self.started_at > STABLE_AFTER_S:
                self.num_failures = 0
            delay = 0.0 if self.num_failures == 0 else min(
                BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (self.num_failures - 1))
            self.num_failures += 1
            self.restart_at = now + delay
            logger.warning("%s exited with code %s; restarting in %.1f s", self.name, code, delay)
        if now >= self.restart_at:
            self.start()
            logger.info("%s restarted (pid %d)", self.name, self.process.pid)

    def signal(self, signum: int) -> None:
        """Send `signum` to the child's whole process group (if it runs)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the group, wait up to `timeout_s`, then SIGKILL it."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
        try:  # whatever is left of its group, the leader gone or not
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()


class Supervisor:
    """Runs the replicas and the gateway of one `scalellm serve` until a signal asks it to stop."""

    def __init__(self, replica_argvs: list[list[str]], replica_addresses: list[str],
                 gateway_config: GatewayConfig, *, startup_timeout_s: float = 600.0) -> None:
        self.replicas = [ChildProcess(f"replica {i} ({address})", argv)
                         for i, (argv, address) in enumerate(zip(replica_argvs, replica_addresses))]
        self.replica_addresses = replica_addresses
        self.gateway_config = gateway_config
        payload = json.dumps(dataclasses.asdict(gateway_config)).encode()
        self.gateway = ChildProcess("gateway", [sys.executable, "-m", "scalellm.supervisor", "gateway"],
                                    payload)
        self.startup_timeout_s = startup_timeout_s
        self._stop_requested = False

    def run(self) -> int:
        """Start everything, supervise until SIGINT/SIGTERM, stop everything; returns the exit code."""
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            check_port_free(self.gateway_config.host, self.gateway_config.port)
            for replica in self.replicas:
                replica.start()
            model_name = asyncio.run(self._wait_for_replicas())
            self.gateway.start()
            self._wait_for_gateway()
            config = self.gateway_config
            print(f"ScaleLLM serving {model_name} at http://{config.host}:{config.port} "
                  f"({len(self.replicas)} replica{'s' if len(self.replicas) != 1 else ''})", flush=True)
            while not self._stop_requested:
                now = time.monotonic()
                for child in (*self.replicas, self.gateway):
                    child.check_restart(now)
                time.sleep(POLL_INTERVAL_S)
            return 0
        except StartupError as error:
            if not self._stop_requested:
                logger.error("%s", error)
                return 1
            return 0
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _request_stop(self, signum: int, frame) -> None:
        if not self._stop_requested:
            logger.info("received %s: draining and stopping", signal.Signals(signum).name)
        self._stop_requested = True

    def _check_startup(self, child: ChildProcess, deadline: float) -> None:
        if self._stop_requested:
            raise StartupError("stopped during startup")
        if child.poll() is not None:
            raise StartupError(f"{child.name} exited with code {child.poll()} during startup")
        if time.monotonic() > deadline:
            raise StartupError(f"{child.name} not ready after {self.startup_timeout_s:.0f} s")

    async def _wait_for_replicas(self) -> str:
        """Wait until every replica answers Health as serving; returns the served model's name."""
        from scalellm.gateway.replica_client import ReplicaClient, ReplicaError

        deadline = time.monotonic() + self.startup_timeout_s
        clients = [ReplicaClient(address) for address in self.replica_addresses]
        try:
            for replica, client in zip(self.replicas, clients):
                while True:
                    self._check_startup(replica, deadline)
                    try:
                        if (await client.health()).healthy:
                            break
                    except ReplicaError:
                        pass
                    await asyncio.sleep(POLL_INTERVAL_S)
                logger.info("%s ready", replica.name)
            model_name, _ = await clients[0].info()
            return model_name
        finally:
            for client in clients:
                await client.close()

    def _wait_for_gateway(self) -> None:
        host = self.gateway_config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        deadline = time.monotonic() + 60.0
        while True:
            self._check_startup(self.gateway, deadline)
            try:
                with socket.create_connection((host, self.gateway_config.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(POLL_INTERVAL_S)

    def _shutdown(self) -> None:
        """Gateway first (it drains in-flight requests), then the replicas."""
        self.gateway.stop(self.gateway_config.drain_timeout_s + 10.0)
        for replica in self.replicas:
            replica.signal(signal.SIGTERM)
        for replica in self.replicas:
            replica.stop(REPLICA_STOP_TIMEOUT_S)


class StartupError(RuntimeError):
    """A child died or did not become ready during startup."""


def die_with_parent() -> None:
    """In a supervisor's child: get SIGTERM when the supervisor dies, and exit now if it already has."""
    parent = env.parent_pid()
    if parent is None:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: orphans are left to the process group signal
        pass
    if os.getppid() != parent:
        sys.exit("the supervisor exited before this process started")


def check_port_free(host: str, port: int) -> None:
    """Fail fast (before loading models) when the gateway's port is already taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from None


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


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free right now on `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _gateway_child_main() -> None:
    """Entry point of the gateway child: reads its GatewayConfig as JSON on stdin and runs it."""
    die_with_parent()
    from scalellm.gateway.app import run_gateway

    fields = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    run_gateway(GatewayConfig(**fields))


if __name__ == "__main__":
    _gateway_child_main()
