"""The communication interface of the parallel layers, over torch.distributed's c10d process groups.

    ParallelGroup         rank, world_size and the three collectives the engine needs
    ├─ SingleRank         world size 1: every collective is the identity; torch.distributed is not touched
    └─ DistributedGroup   c10d backends: gloo for CPU tensors, NCCL for CUDA tensors, plus a gloo
                          group for control messages (CPU bytes) on either device

Layers receive their group at construction, so a model file builds the same layers at any world size
and the single-rank path costs one Python call per collective.
"""

from __future__ import annotations

import datetime
from abc import ABC, abstractmethod

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = datetime.timedelta(days=30)
"""Workers wait on the control group for the next step, however long the engine stays idle."""
LOOPBACK = "127.0.0.1"


class ParallelGroup(ABC):
    """The ranks of one tensor-parallel group.

    Every rank calls the same collectives in the same order with tensors of the same shapes (SPMD):
    a rank that skips one, or a rank that died, makes the others fail (a closed connection) or time out.
    """

    rank: int
    world_size: int

    @abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over the ranks, on every rank (`tensor` may be overwritten)."""

    @abstractmethod
    def gather_to_first(self, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        """The ranks' tensors concatenated along `dim`, in rank order, on rank 0; None on other ranks."""

    @abstractmethod
    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0's `data` on every rank (others pass None); the control plane (step messages)."""

    def close(self) -> None:
        """Release the connections; the group is unusable afterwards."""


class SingleRank(ParallelGroup):
    """A group of one: no communication at all."""

    rank = 0
    world_size = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather_to_first(self, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        return tensor

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        if data is None:
            raise ValueError("rank 0 must pass the bytes to broadcast")
        return data


def create_store(world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (read it from `store.port`)."""
    return dist.TCPStore(LOOPBACK, 0, world_size, is_master=True, wait_for_workers=False, timeout=timeout)


def connect_store(port: int, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=timeout)


class DistributedGroup(ParallelGroup):
    """`world_size` processes on this machine joined through rank 0's TCPStore.

    Creating it blocks until every rank has created it too. `timeout` bounds each compute collective
    (a rank that hangs fails the others after it); the control group waits up to CONTROL_TIMEOUT.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, device: torch.device,
                 timeout: datetime.timedelta) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.store = store  # NCCL connects lazily through it, at the first collective
        self.control = _gloo(dist.PrefixStore("control", store), rank, world_size, CONTROL_TIMEOUT)
        if device.type == "cuda":
            self.compute = _nccl(dist.PrefixStore("compute", store), rank, world_size, timeout)
        elif device.type == "cpu":
            self.compute = _gloo(dist.PrefixStore("compute", store), rank, world_size, timeout)
        else:
            raise ValueError(f"tensor parallelism runs on cpu (gloo) or cuda (NCCL), not {device.type}")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()  # c10d reduces the underlying storage: views must be compacted
        self.compute.allreduce([tensor]).wait()
        return tensor

    def gather_to_first(self, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        tensor = tensor.contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank != 0:
            self.compute.gather([], [tensor], options).wait()
            return None
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.compute.gather([parts], [tensor], options).wait()
        return torch.cat(parts, dim=dim)

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        size = torch.tensor([len(data) if self.rank == 0 else 0], dtype=torch.int64)
        self._broadcast(size)
        payload = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0
                   else torch.empty(int(size), dtype=torch.uint8))
        if payload.numel():
            self._broadcast(payload)
        return data if self.rank == 0 else payload.numpy().tobytes()

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        self.control.broadcast([tensor], options).wait()

    def close(self) -> None:
        for backend in (self.compute, self.control):
            try:
                backend.shutdown()
            except (RuntimeError, AttributeError):  # already broken by a dead peer
                pass


def _gloo(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta):
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def _nccl(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta):
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, world_size, options)
