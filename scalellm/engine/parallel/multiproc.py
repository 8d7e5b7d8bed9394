"""The multi-process executor: rank 0 in the engine process drives N-1 worker processes.

    engine process (rank 0)                               worker processes (ranks 1..N-1)
    ───────────────────────                               ───────────────────────────────
    scheduler ─ SchedulerOutput ─ DiffEncoder ─ broadcast ──▶ RequestMirror ─ SchedulerOutput
    ModelRunner (share 0) ◀──── all-reduce / gather ────────▶ ModelRunner (share r)
    sampler (logits gathered here)

Start: rank 0 opens a TCPStore on a free loopback port, spawns the workers with the port, waits until
each has connected (watching that none died), then every rank joins the c10d groups, loads its share
and passes a handshake.

Failure: a watcher thread per worker waits for its exit; an unexpected exit marks the executor failed
and calls `on_failure` (the engine loop wakes and fails). A step in flight fails on its own: gloo
reports the closed connection. Workers get SIGKILL when the thread that started them ends
(PR_SET_PDEATHSIG), so they never outlive rank 0; a normal shutdown asks them to return and waits.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
import threading
import time
import weakref
from typing import Callable, Iterable

import torch

from scalellm.config import EngineConfig
from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from scalellm.engine.parallel.executor import Executor, WorkerDiedError, threads_per_rank
from scalellm.engine.parallel.group import DistributedGroup, create_store
from scalellm.engine.parallel.messages import encode_score, encode_shutdown, encode_step
from scalellm.engine.parallel.step_diff import DiffEncoder
from scalellm.engine.parallel.worker import WorkerSpec, handshake, rank_device, ready_key

TIMEOUT_S = 300.0
"""Bound on joining the group and on each collective (a hung rank fails the others after it)."""
SHUTDOWN_TIMEOUT_S = 10.0
POLL_S = 0.05
EXIT_GRACE_S = 2.0
"""After a failed collective, how long to wait for a worker's exit to explain it."""


class WorkerProcess:
    """One worker rank's process, its spec written to its stdin."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.rank = spec.rank
        self.process = subprocess.Popen([sys.executable, "-m", "scalellm.engine.parallel.worker"],
                                        stdin=subprocess.PIPE)
        self.process.stdin.write(spec.to_json())
        self.process.stdin.close()

    def describe_exit(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"worker rank {self.rank} (pid {self.process.pid}) exited with code {code}"


class MultiprocExecutor(Executor):
    """tensor_parallel_size N: this process is rank 0 and owns N-1 worker processes."""

    def __init__(self, config: EngineConfig, files: ModelFiles, max_model_len: int, device: torch.device,
                 dtype: torch.dtype, on_failure: Callable[[], None] | None = None) -> None:
        self._failure: str | None = None
        self._closed = False
        self._on_failure = on_failure
        world_size = config.tensor_parallel_size
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"tensor_parallel_size {world_size} needs one GPU per rank; "
                             f"{torch.cuda.device_count()} visible")
        timeout = datetime.timedelta(seconds=TIMEOUT_S)
        store = create_store(world_size, timeout)
        self.workers = [WorkerProcess(WorkerSpec(
            config=config, rank=rank, world_size=world_size, store_port=store.port, parent_pid=os.getpid(),
            max_model_len=max_model_len, device_type=device.type, dtype=str(dtype).removeprefix("torch."),
            num_threads=threads_per_rank(config), timeout_s=TIMEOUT_S)) for rank in range(1, world_size)]
        self._kill_workers = weakref.finalize(self, _kill, [w.process for w in self.workers])
        try:
            with self._failures_explained():
                self._wait_until_connected(store)
                device = rank_device(device.type, 0)
                self.group = DistributedGroup(store, 0, world_size, device, timeout)
                self.runner = ModelRunner(config, files, max_model_len, device, dtype, self.group)
                handshake(self.group, self.runner.num_blocks, device)
        except BaseException:
            self._kill_workers()
            raise
        self.num_blocks = self.runner.num_blocks
        self.weights, self.kv_dtype = self.runner.weights, self.runner.kv_dtype
        self.encoder = DiffEncoder()
        me = weakref.ref(self)
        for worker in self.workers:
            threading.Thread(target=_watch, args=(me, worker), name=f"watch-rank-{worker.rank}", daemon=True).start()

    def _wait_until_connected(self, store) -> None:
        """Until every worker has connected to the store (and so is about to join the group)."""
        deadline = time.monotonic() + TIMEOUT_S
        keys = [ready_key(worker.rank) for worker in self.workers]
        while not store.check(keys):
            for worker in self.workers:
                exited = worker.describe_exit()
                if exited is not None:
                    raise WorkerDiedError(f"{exited} while starting (see its error above)")
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"the worker ranks did not connect within {TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)

    @contextlib.contextmanager
    def _failures_explained(self):
        """A failed collective usually means a worker died: say which, once its exit is seen."""
        try:
            yield
        except RuntimeError as exc:
            if isinstance(exc, WorkerDiedError):
                raise
            deadline = time.monotonic() + EXIT_GRACE_S
            while time.monotonic() < deadline:
                exited = next(filter(None, (w.describe_exit() for w in self.workers)), None)
                if exited is not None:
                    self._failure = self._failure or exited
                    raise WorkerDiedError(exited) from exc
                time.sleep(POLL_S)
            raise

    def execute(self, scheduled: SchedulerOutput, between_layers: Callable[[], None] | None = None
                ) -> ModelRunnerOutput:
        self.check_alive()
        message = encode_step(self.encoder.encode(scheduled))
        with self._failures_explained():
            self.group.broadcast_bytes(message)
            return self.runner.execute(scheduled, between_layers)

    def release(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.runner.release(request_ids)
        self.encoder.forget(request_ids)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        self.check_alive()
        with self._failures_explained():
            self.group.broadcast_bytes(encode_score(token_ids))
            return self.runner.score(token_ids)

    def check_alive(self) -> None:
        if self._failure is not None:
            raise WorkerDiedError(self._failure)
        if self._closed:
            raise RuntimeError("the executor was shut down")

    def _worker_exited(self, worker: WorkerProcess) -> None:
        """From a watcher thread: an exit before shutdown is a failure."""
        if self._closed:
            return
        self._failure = self._failure or worker.describe_exit()
        if self._on_failure is not None:
            self._on_failure()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._failure is None:
            try:
                self.group.broadcast_bytes(encode_shutdown())
            except RuntimeError:  # a worker is gone after all: the others are killed below
                pass
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
            for worker in self.workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.process.wait(max(0.0, deadline - time.monotonic()))
        self._kill_workers()
        self.group.close()


def _watch(executor_ref: weakref.ref, worker: WorkerProcess) -> None:
    """Wait for the worker's exit; holds no strong reference to the executor while waiting."""
    worker.process.wait()
    executor = executor_ref()
    if executor is not None:
        executor._worker_exited(worker)


def _kill(processes: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is still running and reap it (also run at exit or when the executor is collected)."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait()
