"""Child processes and ports: what a supervisor of processes on this machine is made of.

A `ChildProcess` runs in its own process group (a terminal's Ctrl-C reaches only its parent), is
restarted with exponential backoff when it dies, and asks the kernel for SIGTERM should its parent
die (`die_with_parent`, called first thing in the child), so none is orphaned.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from scalellm import env

logger = logging.getLogger("scalellm.supervisor")

POLL_INTERVAL_S = 0.2
"""How often supervisors look at their children."""
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
"""A child that ran this long before dying restarts without backoff."""
_PR_SET_PDEATHSIG = 1


def restart_backoff(num_failures: int, started_at: float, now: float) -> tuple[float, int]:
    """(seconds to wait before restarting a process that just failed, its failure count after this
    one): a process that ran longer than STABLE_AFTER_S restarts at once; repeated failures wait
    BACKOFF_INITIAL_S, doubling up to BACKOFF_MAX_S."""
    if now - started_at > STABLE_AFTER_S:
        num_failures = 0
    delay = 0.0 if num_failures == 0 else min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (num_failures - 1))
    return delay, num_failures + 1


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
            delay, self.num_failures = restart_backoff(self.num_failures, self.started_at, now)
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


def freeze_loaded_objects() -> None:
    """In a serving process, once started: keep what loading made out of every later garbage
    collection. A tokenizer alone is a million or more objects that live as long as the process; a full
    collection walks all of them (0.3 s on the 1.5B's), a stall in whichever step it falls on. A gateway
    holds no model, but its imports (gRPC, protobuf, the metrics and tracing libraries) are walked the
    same way, a few times a second under load."""
    gc.collect()
    gc.freeze()


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
