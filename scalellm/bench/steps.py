"""Stepped load: a closed loop whose concurrency follows a schedule, e.g. ``1:60,64:120,1:60``.

``C:S`` holds C requests in flight for S seconds, then the next step starts. Worker k (of max C)
sends requests back to back while the current step's concurrency is above k and sleeps otherwise;
a request that is in flight when its worker's step ends finishes (and counts for the step it was
sent in) but no new one follows. Each step is summarized like a bench point (`summarize`): its
requests are those sent during it, its window runs from its start to the end of the last of them.

A timeline in buckets of a few seconds (output tokens/s from the chunk arrival times, E2E p50 of
the requests that ended in the bucket) shows the transitions; with a ScaleLLM server the
deployment shape (``scalellm:shape_info`` in /metrics) is sampled every second alongside.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from scalellm.bench.client import ClientConfig, RequestResult, make_session, send_request
from scalellm.bench.metrics import RunWindow, percentile, summarize

SHAPE_SAMPLE_S = 1.0
_SHAPE_LINE = re.compile(r'^scalellm:shape_info\{(?=[^}]*replicas="(\d+)")(?=[^}]*parallel="(\d+)")[^}]*\}\s+1(\.0)?\s*$',
                         re.MULTILINE)


@dataclass(frozen=True)
class LoadStep:
    """Hold `concurrency` requests in flight for `duration_s` seconds."""

    concurrency: int
    duration_s: float

    def __post_init__(self) -> None:
        if self.concurrency < 1 or not self.duration_s > 0 or not math.isfinite(self.duration_s):
            raise ValueError(f"a load step needs concurrency >= 1 and seconds > 0, got "
                             f"{self.concurrency}:{self.duration_s}")


def parse_load_steps(text: str) -> tuple[LoadStep, ...]:
    """argparse type: ``"1:60,64:120"`` -> (LoadStep(1, 60.0), LoadStep(64, 120.0))."""
    steps = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        concurrency, sep, seconds = item.partition(":")
        try:
            steps.append(LoadStep(int(concurrency), float(seconds)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"load steps look like 1:60,64:120 (concurrency:seconds), "
                                             f"got {item!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"load step {item!r} needs concurrency:seconds")
    if not steps:
        raise argparse.ArgumentTypeError("expected load steps like 1:60,64:120")
    return tuple(steps)


class StepClock:
    """Which step runs at time t (seconds since the start), and when a worker is next needed. Pure."""

    def __init__(self, steps: Sequence[LoadStep]) -> None:
        self.steps = tuple(steps)
        self.starts = list(itertools.accumulate((s.duration_s for s in self.steps), initial=0.0))

    @property
    def total_s(self) -> float:
        return self.starts[-1]

    def step_at(self, t: float) -> int | None:
        """Index of the step running at t; None once the schedule is over."""
        for index, step in enumerate(self.steps):
            if t < self.starts[index + 1]:
                return index
        return None

    def next_active(self, worker: int, t: float) -> float | None:
        """The first step start after t at which `worker` sends again; None when it never does."""
        for index, step in enumerate(self.steps):
            if self.starts[index] > t and step.concurrency > worker:
                return self.starts[index]
        return None


@dataclass
class StepRun:
    """The raw outcome of a stepped run: (step index, result) pairs and the sampled shapes."""

    start_wall: float
    results: list[tuple[int, RequestResult]]
    shapes: list[tuple[float, str]]
    """(seconds since the start, "RxP") whenever the sampled shape changed."""


async def run_steps(client: ClientConfig, steps: Sequence[LoadStep], make_body: Callable[[int], bytes],
                    warmup_bodies: Sequence[bytes] = (), on_done: Callable | None = None) -> StepRun:
    """Warm up, then follow the schedule (see the module docstring)."""
    clock = StepClock(steps)
    counter = itertools.count()
    results: list[tuple[int, RequestResult]] = []
    async with make_session(client, max(s.concurrency for s in steps) + 1) as session:
        for body in warmup_bodies:
            result = await send_request(session, client, body)
            if not result.success:
                raise RuntimeError(f"warm-up request to {client.url} failed: {result.error}")
        start = time.perf_counter()
        run = StepRun(time.time(), results, [])

        async def worker(k: int) -> None:
            while (index := clock.step_at(time.perf_counter() - start)) is not None:
                if k < clock.steps[index].concurrency:
                    result = await send_request(session, client, make_body(next(counter)))
                    results.append((index, result))
                    if on_done:
                        on_done(result)
                    continue
                wake = clock.next_active(k, time.perf_counter() - start)
                if wake is None:
                    return
                await asyncio.sleep(max(0.0, wake - (time.perf_counter() - start)))

        sampler = asyncio.get_running_loop().create_task(_sample_shapes(session, client, start, run.shapes))
        try:
            await asyncio.gather(*(worker(k) for k in range(max(s.concurrency for s in steps))))
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    return run


async def _sample_shapes(session, client: ClientConfig, start: float, shapes: list) -> None:
    """Record the server's scalellm:shape_info whenever it changes; stop quietly if there is none."""
    while True:
        try:
            async with session.get(client.base_url + "/metrics") as response:
                if response.status != 200:
                    return
                match = _SHAPE_LINE.search(await response.text())
        except Exception:  # noqa: BLE001 - sampling is best effort; the load goes on
            match = None
        if match is not None:
            label = f"{match.group(1)}x{match.group(2)}"
            if not shapes or shapes[-1][1] != label:
                shapes.append((round(time.perf_counter() - start, 2), label))
        await asyncio.sleep(SHAPE_SAMPLE_S)


def summarize_steps(run: StepRun, steps: Sequence[LoadStep], settle_s: float = 0.0) -> list[dict]:
    """One bench summary per step, with its index, concurrency, start and length.

    With `settle_s` > 0 each row also has "settled": the summary of the requests sent from settle_s
    after the step's start on (the step once a system has adapted to it), None for a shorter step.
    """
    clock = StepClock(steps)
    rows = []
    for index, step in enumerate(steps):
        requests = [result for step_index, result in run.results if step_index == index]
        step_start = run.start_wall + clock.starts[index]
        row = {"step": index, "concurrency": step.concurrency, "start_s": clock.starts[index],
               "duration_s": step.duration_s, "summary": _summarize_window(requests, step_start, step)}
        if settle_s > 0:
            settled = [r for r in requests if r.start_wall >= step_start + settle_s]
            row["settled"] = (_summarize_window(settled, step_start + settle_s, step, settle_s)
                              if settle_s < step.duration_s else None)
        rows.append(row)
    return rows


def _summarize_window(requests: list[RequestResult], start: float, step: LoadStep, skipped_s: float = 0.0) -> dict:
    """Summary over a window from `start` to the end of the step or of its last request, whichever is later."""
    length = step.duration_s - skipped_s
    last_end = max((r.start_wall + r.latency for r in requests), default=start + length)
    return summarize(requests, RunWindow(duration_s=max(length, last_end - start), concurrency=step.concurrency))


def timeline(run: StepRun, steps: Sequence[LoadStep], bucket_s: float = 5.0) -> list[dict]:
    """Per bucket: scheduled concurrency, output tokens/s, requests ended and their E2E p50, shape."""
    clock = StepClock(steps)
    num_buckets = max(1, math.ceil(clock.total_s / bucket_s))
    tokens = [0.0] * (num_buckets + 64)
    latencies: list[list[float]] = [[] for _ in tokens]
    for _, result in run.results:
        if not result.success:
            continue
        offset = result.start_wall - run.start_wall
        moment = offset + result.ttft
        per_chunk = result.output_tokens / (len(result.itl) + 1)  # a whole body is one chunk
        for gap in [0.0, *result.itl]:
            moment += gap
            tokens[min(len(tokens) - 1, max(0, int(moment // bucket_s)))] += per_chunk
        latencies[min(len(tokens) - 1, max(0, int((offset + result.latency) // bucket_s)))].append(result.latency)
    rows = []
    for bucket in range(len(tokens)):
        t = bucket * bucket_s
        if t >= clock.total_s and not latencies[bucket]:
            break
        index = clock.step_at(t)
        rows.append({"t": t, "concurrency": steps[index].concurrency if index is not None else 0,
                     "output_throughput": tokens[bucket] / bucket_s, "completed": len(latencies[bucket]),
                     "median_e2el_ms": percentile(latencies[bucket], 50) * 1000.0 if latencies[bucket] else None,
                     "shape": _shape_at(run.shapes, t + bucket_s / 2)})
    return rows


def _shape_at(shapes: list[tuple[float, str]], t: float) -> str | None:
    label = None
    for moment, shape in shapes:
        if moment <= t:
            label = shape
    return label
