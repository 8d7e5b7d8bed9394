"""AsyncLLM: the real engine behind a replica, driven from asyncio.

    asyncio thread                                   engine thread
    ──────────────                                   ─────────────
    generate(): tokenize, chat template  ──inbox──▶  add samples / finish samples
                                                     loop: schedule → run model → update
    output processor: detokenize, stop   ◀─call_soon_threadsafe── per-step token updates
    strings, per-request queues

Tokenization and detokenization run on the asyncio thread, overlapping the next model step (torch
releases the GIL inside its kernels). The engine thread sleeps on an event when it has no work:
no busy polling. With tensor parallelism the engine thread also starts and stops the worker ranks; a
worker that dies wakes it, the loop fails, and `wait_failed` returns (the replica then exits).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Sequence

from scalellm.config import EngineConfig
from scalellm.engine.client import EngineClient
from scalellm.engine.engine_core import EngineCore
from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.loader import ModelFiles
from scalellm.engine.output_processor import OutputProcessor
from scalellm.engine.request import RequestStatus
from scalellm.engine.structured import LazyGrammarCache, attach_grammars
from scalellm.protocol.types import (EngineHealth, EngineLoad, PromptInput, RequestMetrics, RequestOutput,
                                     ResumedSample, SamplingParams)
from scalellm.protocol.deltas import merge_delta

STALL_SECONDS = 30.0
"""An engine with work that made no step for this long is reported unhealthy."""


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight end with this error."""


class AsyncLLM(EngineClient):
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None) -> None:
        """files: the model to serve (default: opened from `config.model`; a FakeModelFiles for the mock)."""
        self.config = config
        self._files = files
        self.model_name = ""
        self.max_model_len = 0
        self.weights = ""
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._queues: dict[str, asyncio.Queue] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._error: BaseException | None = None
        self._load = EngineLoad(0, 0, 0, 0, 0)
        self._last_progress = time.monotonic()
        self._busy = False
        self._failed = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()
        self._loop = loop
        self._thread = threading.Thread(target=self._run, args=(ready,), name="engine-loop", daemon=True)
        self._thread.start()
        core = await ready
        self.model_name, self.max_model_len = core.files.name, core.max_model_len
        self.weights = core.executor.weights
        self.tokenizer = core.files.load_tokenizer()
        self.input_processor = InputProcessor.for_core(core, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._grammars = LazyGrammarCache.for_input_processor(self.input_processor)
        # The tokenizer's grammar tables (about a second) are built in the background now, so the first
        # structured request pays only its own compile.
        self._grammar_warmup = loop.run_in_executor(None, self._grammars.warm_up)

    async def shutdown(self) -> None:
        for request_id in list(self._queues):
            await self.abort(request_id)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    async def generate(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                       metrics: RequestMetrics | None = None,
                       resumed_samples: Sequence[ResumedSample] = (), final_only: bool = False
                       ) -> AsyncIterator[RequestOutput]:
        if self._error is not None:
            raise EngineDeadError(f"the engine loop failed: {self._error}")
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in flight")
        metrics = metrics or RequestMetrics()
        metrics.replica_receive_time = metrics.replica_receive_time or time.time()
        prompt_token_ids = self.input_processor.tokenize(prompt)
        samples = self.input_processor.make_requests(request_id, prompt_token_ids, params,
                                                     resumed_samples=resumed_samples)
        if params.structured is not None:  # compiled off this thread and the engine's, with a deadline
            attach_grammars(samples, await self._grammars.compile(params.structured))
        outputs: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = outputs
        self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None,
                                          samples, metrics, delta=True, final_only=final_only)
        metrics.queued_time = time.time()
        self._send(("add", samples))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                while not outputs.empty() and not isinstance(output, BaseException):
                    output = merge_delta(output, outputs.get_nowait())
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)

    def _abort_now(self, request_id: str) -> None:
        if not self.output_processor.has_request(request_id):
            return
        self._send(("finish", self.output_processor.sample_ids(request_id), RequestStatus.FINISHED_ABORTED))
        final = self.output_processor.abort(request_id)
        target = self._queues.get(request_id)
        if target is not None and final is not None:
            target.put_nowait(final)

    async def wait_failed(self) -> BaseException:
        """Return the error once the engine loop has died (a worker rank exited, a model error)."""
        await self._failed.wait()
        return self._error

    def health(self) -> EngineHealth:
        if self._error is not None:
            return EngineHealth(False, f"engine loop failed: {self._error}")
        if self._thread is None or not self._thread.is_alive():
            return EngineHealth(False, "engine loop is not running")
        stalled = time.monotonic() - self._last_progress
        if self._busy and stalled > STALL_SECONDS:
            return EngineHealth(False, f"engine made no progress for {stalled:.0f} s")
        return EngineHealth(True, "ok")

    def load(self) -> EngineLoad:
        return self._load

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    # ---- engine thread ----

    def _run(self, ready: asyncio.Future) -> None:
        try:
            core = EngineCore(self.config, self._files, on_failure=self._wake.set)
        except BaseException as exc:  # report load failures to start()
            self._loop.call_soon_threadsafe(_set_exception, ready, exc)
            return
        self._loop.call_soon_threadsafe(_set_result, ready, core)
        self._load = core.load()
        try:
            self._loop_forever(core)
        except BaseException as exc:  # the loop died: fail every request, report unhealthy
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)
        finally:
            core.shutdown()

    def _loop_forever(self, core: EngineCore) -> None:
        while not self._stopping:
            core.check_alive()
            self._drain_inbox(core)
            self._busy = core.has_work()
            if not self._busy:
                self._load = core.load()
                core.mark_idle()
                self._wake.wait()
                self._wake.clear()
                self._last_progress = time.monotonic()
                continue
            updates = core.step()
            self._last_progress = time.monotonic()
            self._load = core.load()
            if updates:
                self._loop.call_soon_threadsafe(self._deliver, updates)

    def _drain_inbox(self, core: EngineCore) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(core, command[1])
            else:
                core.finish_requests(command[1], command[2])

    def _add(self, core: EngineCore, samples) -> None:
        try:
            core.add_requests(samples)
        except ValueError as exc:  # the scheduler refused it: end that request, keep serving
            core.finish_requests([s.request_id for s in samples], RequestStatus.FINISHED_ABORTED)
            self._loop.call_soon_threadsafe(self._fail_one, samples[0], exc)

    # ---- back on the asyncio thread ----

    def _fail_one(self, sample, exc: ValueError) -> None:
        for request_id, target in self._queues.items():
            if sample.request_id in self.output_processor.sample_ids(request_id):
                self.output_processor.abort(request_id)
                target.put_nowait(exc)

    def _deliver(self, updates) -> None:
        processed = self.output_processor.process(updates)
        if processed.stopped_sample_ids:
            self._send(("finish", processed.stopped_sample_ids, RequestStatus.FINISHED_STOPPED))
        for output in processed.outputs:
            target = self._queues.get(output.request_id)
            if target is not None:
                target.put_nowait(output)

    def _fail_all(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine loop failed: {exc}")
        for target in self._queues.values():
            target.put_nowait(error)
        self._failed.set()


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
