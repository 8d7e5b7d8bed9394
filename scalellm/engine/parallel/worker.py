"""A worker rank: `python -m scalellm.engine.parallel.worker`, its WorkerSpec as JSON on stdin.

    start: die with rank 0 · join the group · load this rank's share of the model · handshake
    loop:  receive a control message ─ step: apply the diff to the mirror, run the step (no sampling)
                                      ─ score: run the scoring pass
                                      ─ shutdown: return

A worker has no state worth saving: when rank 0 dies it is killed (PR_SET_PDEATHSIG), and when its
collective fails (a peer closed the connection) it exits with an error. It ignores SIGINT and SIGTERM
(they are for rank 0, which stops it with the shutdown message); SIGKILL ends it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime
import os
import signal
import sys
import traceback
from dataclasses import dataclass

import orjson
import torch

from scalellm.config import EngineConfig
from scalellm.engine.device import resolve_dtype
from scalellm.engine.parallel.group import DistributedGroup, ParallelGroup, connect_store
from scalellm.engine.parallel.messages import SHUTDOWN, STEP, decode
from scalellm.engine.parallel.step_diff import RequestMirror

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker rank needs to build the same engine share as rank 0 would."""

    config: EngineConfig
    rank: int
    world_size: int
    store_port: int
    """Rank 0's TCPStore on the loopback interface."""
    parent_pid: int
    """Rank 0's process: the worker must not outlive it."""
    max_model_len: int
    device_type: str
    """"cpu" or "cuda" (rank r uses CUDA device r)."""
    dtype: str
    num_threads: int | None
    timeout_s: float
    """Bound on each compute collective and on joining the group."""

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> "WorkerSpec":
        fields = orjson.loads(data)
        return cls(**{**fields, "config": EngineConfig(**fields["config"])})


def ready_key(rank: int) -> str:
    """The store key a worker sets once connected, just before it joins the group."""
    return f"scalellm/worker/{rank}/connected"


def rank_device(device_type: str, rank: int) -> torch.device:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device(device_type)


def handshake(group: ParallelGroup, num_blocks: int, device: torch.device) -> None:
    """A barrier after loading that also checks every rank sized the same KV cache."""
    totals = group.all_reduce(torch.tensor([num_blocks, 1], dtype=torch.int64, device=device))
    if group.rank == 0 and totals.tolist() != [num_blocks * group.world_size, group.world_size]:
        raise RuntimeError(f"the ranks disagree on the number of KV blocks ({totals.tolist()})")


def serve(group: ParallelGroup, runner) -> None:
    """Run the steps rank 0 broadcasts until it says shutdown."""
    mirror = RequestMirror()
    while True:
        kind, payload = decode(group.broadcast_bytes(None))
        if kind == SHUTDOWN:
            return
        if kind == STEP:
            runner.execute(mirror.apply(payload))
        else:
            runner.score(payload)


def run_worker(spec: WorkerSpec) -> None:
    from scalellm.engine.loader import open_model_files
    from scalellm.engine.model_runner import ModelRunner

    if spec.num_threads is not None:
        torch.set_num_threads(spec.num_threads)
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    store = connect_store(spec.store_port, spec.world_size, timeout)
    store.set(ready_key(spec.rank), "1")
    device = rank_device(spec.device_type, spec.rank)
    group = DistributedGroup(store, spec.rank, spec.world_size, device, timeout)
    runner = ModelRunner(spec.config, open_model_files(spec.config.model), spec.max_model_len, device,
                         resolve_dtype(spec.dtype, device), group)
    handshake(group, runner.num_blocks, device)
    serve(group, runner)
    group.close()


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread of rank 0 that started it ends; exit now if rank 0 is gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed connections end the worker instead
        pass
    if os.getppid() != parent_pid:
        sys.exit("rank 0 exited before this worker started")


def main() -> None:
    spec = WorkerSpec.from_json(sys.stdin.buffer.read())
    sys.stdin.close()
    die_with_parent(spec.parent_pid)
    # Rank 0 owns the workers' lifetime: a terminal's Ctrl-C or a supervisor's SIGTERM to the process
    # group reaches rank 0, which lets requests in flight finish and then stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        run_worker(spec)
    except Exception:  # noqa: BLE001 - report and exit non-zero; rank 0 sees the exit code
        traceback.print_exc()
        sys.exit(f"scalellm worker rank {spec.rank} failed")


if __name__ == "__main__":
    main()
