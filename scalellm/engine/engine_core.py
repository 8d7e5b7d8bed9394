"""The engine core: scheduler plus model runner, one step at a time. Single-threaded, synchronous."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch

from scalellm.config import EngineConfig
from scalellm.engine.core_board import CoreBoard
from scalellm.engine.device import resolve_device, resolve_dtype
from scalellm.engine.kv_cache.groups import block_bytes, kv_groups
from scalellm.engine.loader import ModelFiles, open_model_files
from scalellm.engine.parallel.executor import make_executor, threads_per_rank
from scalellm.engine.request import Request, RequestStatus
from scalellm.engine.scheduler import RequestUpdate, Scheduler
from scalellm.protocol.types import EngineLoad

MAX_CONTEXT_DEFAULT = 8192
LEND_MAX_TOKENS = 16
"""Steps of at most this many tokens may borrow idle replicas' cores (core_board.py): small decode
batches run as one call (the fused decode layers), and their extra threads end within milliseconds
if another replica wakes up. A step of prefill chunks alone (a request arriving at a quiet replica)
may borrow whatever its length: it runs layer by layer and re-reads the board after each layer, so a
replica that wakes meanwhile has its core back after one layer. Steps that mix prefills with decodes
(a replica under load) keep their own share: measured at 64 concurrent requests, letting them borrow
and give back cost 3% of the tokens/s."""


class EngineCore:
    """Owns the executor (the model on one or more ranks) and the scheduler. `step()` reads: schedule,
    run, update. With tensor parallelism, worker ranks open `config.model` themselves (not `files`)."""

    def __init__(self, config: EngineConfig, files: ModelFiles | None = None,
                 on_failure: Callable[[], None] | None = None) -> None:
        """on_failure: called from another thread when a worker rank dies (then `check_alive` raises)."""
        num_threads = threads_per_rank(config)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.config = config
        self.files = files or open_model_files(config.model)
        self.max_model_len = _max_model_len(config, self.files.config.max_position_embeddings)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.executor = make_executor(config, self.files, self.max_model_len, self.device, self.dtype, on_failure)
        # A request must fit in the KV cache alone; the scheduler rejects one that cannot.
        groups = kv_groups(self.files.config)
        self.scheduler = Scheduler(config, self.executor.num_blocks, tuple(g.sliding_window for g in groups))
        capacity = self.scheduler.kv_cache_manager.max_tokens_per_request(config.max_num_batched_tokens)
        _check_kv_holds(config, self.files.config, groups, self.executor.kv_dtype, capacity)
        self.max_model_len = min(self.max_model_len, capacity)
        self.last_step_time = time.monotonic()
        self._threads = torch.get_num_threads()
        self._board = None
        if config.core_board is not None:
            self._board = CoreBoard(config.core_board, config.core_board_slot, self._threads,
                                    config.threads_when_alone or self._threads)

    def add_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Abort (or stop, for stop strings) requests in any state; frees their blocks."""
        self.scheduler.finish_requests(request_ids, status)
        self.executor.release(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestUpdate]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        between_layers = None
        if self._board is not None:
            prefill_only = all(chunk.num_new_tokens > 1 for chunk in scheduled.chunks)
            small = scheduled.num_batched_tokens <= LEND_MAX_TOKENS
            self._use_threads(self._board.step_threads(may_borrow=prefill_only or small))
            if prefill_only:
                between_layers = self._reread_board
        runner_output = self.executor.execute(scheduled, between_layers)
        updates = self.scheduler.update(scheduled, runner_output)
        self.executor.release(u.request.request_id for u in updates if u.finished)
        self.last_step_time = time.monotonic()
        return updates

    def mark_idle(self) -> None:
        """No work: the other replicas on the core board may borrow this one's cores."""
        if self._board is not None:
            self._board.mark_idle()

    def _reread_board(self) -> None:
        """Between two layers of a step: borrow or give back cores as the other replicas now stand."""
        self._use_threads(self._board.step_threads())

    def _use_threads(self, threads: int) -> None:
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def load(self) -> EngineLoad:
        return self.scheduler.get_load()

    def check_alive(self) -> None:
        """Raise WorkerDiedError if a worker rank is gone."""
        self.executor.check_alive()

    def shutdown(self) -> None:
        """Stop the worker ranks (if any) and wait for them."""
        if self._board is not None:
            self._board.close()
        self.executor.shutdown()


def _check_kv_holds(config: EngineConfig, model_config, groups, dtype: torch.dtype, capacity: int) -> None:
    """An explicit max_model_len must fit one request's KV; the default one is cut to what fits."""
    if config.max_model_len is None or config.max_model_len <= capacity:
        return
    from scalellm.engine.kv_cache.manager import KVCacheManager
    from scalellm.engine.layers.partition import max_local_kv_heads

    c = model_config
    kv_heads = max_local_kv_heads(c.num_heads, c.num_kv_heads, config.tensor_parallel_size)
    bytes_per_block = block_bytes(groups, config.block_size, kv_heads, c.head_dim, dtype)
    sizing = KVCacheManager(1, config.block_size, False, tuple(g.sliding_window for g in groups))
    num_blocks = sizing.max_blocks_for(config.max_model_len, config.max_num_batched_tokens)
    needed_gib = num_blocks * bytes_per_block / (1 << 30)
    raise ValueError(f"max_model_len {config.max_model_len} needs {needed_gib:.2f} GiB of KV cache for one request "
                     f"(in {str(dtype).removeprefix('torch.')}), but kv_cache_gib={config.kv_cache_gib} holds "
                     f"{capacity} tokens: give at least --kv-cache-gib {needed_gib:.2f} or lower --max-model-len")


def _max_model_len(config: EngineConfig, model_max: int) -> int:
    if config.max_model_len is None:
        return min(model_max, MAX_CONTEXT_DEFAULT)
    if config.max_model_len > model_max:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context of {model_max} tokens")
    return config.max_model_len
