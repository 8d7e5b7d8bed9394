"""Executors run the model for the engine core: in this process, or on several ranks.

    EngineCore ── execute(SchedulerOutput) ──▶ Executor
                                               ├─ LocalExecutor      one ModelRunner in this process
                                               └─ MultiprocExecutor  rank 0's ModelRunner here, ranks 1..N-1
                                                                     in worker processes (multiproc.py)
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Callable, Iterable

import torch

from scalellm.config import EngineConfig
from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.model_runner import ModelRunner
from scalellm.engine.outputs import ModelRunnerOutput, SchedulerOutput


class WorkerDiedError(RuntimeError):
    """A worker rank exited: the engine cannot step any more (its replica must restart)."""


class Executor(ABC):
    """Runs scheduled steps on every rank and returns rank 0's samples.

    Single-threaded like the engine core: one caller thread for every method. After `shutdown`
    (or a WorkerDiedError) the executor is unusable.
    """

    num_blocks: int
    """KV cache blocks, the same on every rank: the scheduler's block ids index all of them."""
    weights: str
    """How the model runs, e.g. "quantization gguf, dtype bfloat16, kv cache bfloat16" (what "auto" resolved to)."""
    kv_dtype: torch.dtype
    """The KV cache's dtype (device.resolve_kv_dtype)."""

    @abstractmethod
    def execute(self, scheduled: SchedulerOutput, between_layers: Callable[[], None] | None = None
                ) -> ModelRunnerOutput:
        """Run one step on every rank; a token for each chunk that reaches the end of its request.
        `between_layers` runs on this process's rank after each layer of a layer-by-layer step."""

    @abstractmethod
    def release(self, request_ids: Iterable[str]) -> None:
        """Forget finished or aborted requests (per-request state on every rank)."""

    @abstractmethod
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """log p(t_i | t_<i) for i = 1..n-1, outside the scheduler (ModelRunner.score)."""

    @abstractmethod
    def check_alive(self) -> None:
        """Raise WorkerDiedError if a rank is gone."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank and wait for it; safe to call twice and after a failure."""


class LocalExecutor(Executor):
    """tensor_parallel_size 1: the model runner in this process, no communication."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.num_blocks = runner.num_blocks
        self.weights, self.kv_dtype = runner.weights, runner.kv_dtype

    def execute(self, scheduled: SchedulerOutput, between_layers: Callable[[], None] | None = None
                ) -> ModelRunnerOutput:
        return self.runner.execute(scheduled, between_layers)

    def release(self, request_ids: Iterable[str]) -> None:
        self.runner.release(request_ids)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        return self.runner.score(token_ids)

    def check_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def threads_per_rank(config: EngineConfig, num_cores: int | None = None) -> int | None:
    """config.num_threads, else with several ranks an equal share of the cores (None: torch's default)."""
    if config.num_threads is not None or config.tensor_parallel_size == 1:
        return config.num_threads
    cores = num_cores if num_cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // config.tensor_parallel_size)


def make_executor(config: EngineConfig, files: ModelFiles, max_model_len: int, device: torch.device,
                  dtype: torch.dtype, on_failure: Callable[[], None] | None = None) -> Executor:
    """LocalExecutor for one rank, MultiprocExecutor for several (on_failure: called from a watcher
    thread when a worker dies, so an idle engine learns it at once). A fake model brings its own
    (engine/fake_model.py)."""
    from scalellm.engine.fake_model import FakeModelFiles

    if isinstance(files, FakeModelFiles):
        return files.make_executor(config, max_model_len)
    if config.tensor_parallel_size == 1:
        return LocalExecutor(ModelRunner(config, files, max_model_len, device, dtype))
    from scalellm.engine.parallel.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, files, max_model_len, device, dtype, on_failure)
