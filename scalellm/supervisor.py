"""`scalellm serve`: starts N replicas and the gateway, watches them, restarts the ones that die.

    supervisor ─┬─ replica 0   python -m scalellm.cli replica ... --port P0   (own process group)
                ├─ replica N-1 python -m scalellm.cli replica ... --port PN-1
                └─ gateway     python -m scalellm.supervisor gateway  (control channel on its stdin)

The replicas form a `ReplicaSet` of one shape (replicas x threads). The gateway reads its
GatewayConfig from the first line of its stdin and replica-set updates from the next lines (see
scalellm/shape/control.py); the pipe stays open, so with `--shape auto` an `Autopilot` can replace the
whole set at runtime: start the new one, `switch_to` it, drain and stop the old one.

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
from scalellm.shape.shape import Shape

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

    def __init__(self, name: str, argv: list[str], stdin_data: bytes | None = None, *,
                 extra_env: dict[str, str] | None = None, keep_stdin_open: bool = False) -> None:
        self.name = name
        self.argv = argv
        self.stdin_data = stdin_data
        """Written to the child's stdin at every (re)start."""
        self.extra_env = extra_env or {}
        self.keep_stdin_open = keep_stdin_open
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.num_failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        """Spawn the process (stdout and stderr are inherited)."""
        child_env = {**os.environ, env.PARENT_PID_VAR: str(os.getpid()), **self.extra_env}
        self._close_stdin()  # a restart: the dead process's pipe
        self.process = subprocess.Popen(
            self.argv, env=child_env, start_new_session=True,
            stdin=subprocess.PIPE if self.stdin_data is not None else subprocess.DEVNULL)
        if self.stdin_data is not None:
            self.send(self.stdin_data)
            if not self.keep_stdin_open:
                self.process.stdin.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    def send(self, data: bytes) -> bool:
        """Write to the child's stdin (kept open); False when the child is gone (a restart resends `stdin_data`)."""
        pipe = None if self.process is None else self.process.stdin
        if pipe is None or pipe.closed:
            return False
        try:
            pipe.write(data)
            pipe.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False

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
        self._close_stdin()

    def _close_stdin(self) -> None:
        pipe = None if self.process is None else self.process.stdin
        if pipe is not None and not pipe.closed:
            try:
                pipe.close()
            except BrokenPipeError:
                pass


class Supervisor:
    """Runs the replicas and the gateway of one `scalellm serve` until a signal asks it to stop."""

    def __init__(self, replica_argvs: list[list[str]], replica_addresses: list[str],
                 gateway_config: GatewayConfig, *, startup_timeout_s: float = 600.0,
                 shape: Shape | None = None, replica_set=None) -> None:
        """`replica_set` (a scalellm.shape ReplicaSet, not started) replaces the argvs and addresses."""
        from scalellm.shape.deployment import ReplicaSet

        if replica_set is None:
            children = [ChildProcess(f"replica {i} ({address})", argv)
                        for i, (argv, address) in enumerate(zip(replica_argvs, replica_addresses))]
            replica_set = ReplicaSet(shape or Shape(len(children), 1), children, replica_addresses)
        self.replica_set = replica_set
        self.gateway_config = gateway_config
        self.gateway = ChildProcess("gateway", [sys.executable, "-m", "scalellm.supervisor", "gateway"],
                                    self._gateway_input(""), keep_stdin_open=True)
        self.startup_timeout_s = startup_timeout_s
        self.autopilot = None
        """An `Autopilot` (scalellm.shape) that changes the shape with the load, or None for a fixed shape."""
        self._other_sets: list = []
        self._stop_requested = False

    @property
    def replicas(self) -> list[ChildProcess]:
        """The replica processes serving now."""
        return self.replica_set.children

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
            model_name = await self.replica_set.wait_healthy(self.startup_timeout_s, self.stopping)
            self.gateway.start()
            await self._wait_for_gateway()
            print(f"ScaleLLM serving {model_name} at http://{self.gateway_config.host}:"
                  f"{self.gateway_config.port} ({self._describe()})", flush=True)
            if self.autopilot is not None:
                autopilot_task = asyncio.get_running_loop().create_task(self.autopilot.run())
            while not self._stop_requested:
                now = time.monotonic()
                self.replica_set.check_restart(now)
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
        count = len(self.replicas)
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
        from scalellm.shape.control import ReplicaSetUpdate

        addresses = tuple(self.replica_set.addresses)
        config = dataclasses.replace(self.gateway_config, replica_addresses=addresses)
        update = ReplicaSetUpdate(addresses, self.replica_set.shape, reason)
        return json.dumps(dataclasses.asdict(config)).encode() + b"\n" + update.encode()

    def adopt(self, replica_set) -> None:
        """Keep a starting (or draining) replica set in view, so shutdown stops it too."""
        self._other_sets.append(replica_set)

    def switch_to(self, replica_set, reason: str):
        """Serve from `replica_set` (adopted, healthy) from now on; returns the previous set, now unsupervised."""
        from scalellm.shape.control import ReplicaSetUpdate

        previous, self.replica_set = self.replica_set, replica_set
        self._other_sets = [s for s in self._other_sets if s is not replica_set] + [previous]
        self.gateway.stdin_data = self._gateway_input(reason)
        self.gateway.send(ReplicaSetUpdate(tuple(replica_set.addresses), replica_set.shape, reason).encode())
        return previous

    def release(self, replica_set) -> None:
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
            for child in replica_set.children:
                child.signal(signal.SIGTERM)
        for replica_set in sets:
            replica_set.stop(REPLICA_STOP_TIMEOUT_S)


class StartupError(RuntimeError):
    """A child died or did not become ready during startup."""


def check_starting(child: ChildProcess, deadline: float, timeout_s: float, should_stop) -> None:
    """Raise StartupError when a starting child exited, `timeout_s` passed or a stop was requested."""
    if should_stop():
        raise StartupError("stopped during startup")
    if child.poll() is not None:
        raise StartupError(f"{child.name} exited with code {child.poll()} during startup")
    if time.monotonic() > deadline:
        raise StartupError(f"{child.name} not ready after {timeout_s:.0f} s")


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
    """Entry point of the gateway child: config and replica-set updates on stdin (scalellm/shape/control.py)."""
    die_with_parent()
    from scalellm.shape.control import run_supervised_gateway

    run_supervised_gateway()


if __name__ == "__main__":
    _gateway_child_main()
