"""Load generation: a closed loop with exactly C requests in flight, or a Poisson open loop.

Closed loop (``request_rate`` = inf): C workers share one queue of request
indices; each sends its next request as soon as its previous one ended, so C
requests are in flight until fewer than C remain.

Open loop: request i is sent at the i-th arrival of a seeded Poisson process
of rate ``request_rate`` (exponential gaps, the first at t = 0); ``concurrency``
still caps the requests in flight, as ``--max-concurrency`` does in vLLM.

The measured window starts after the warm-up requests (sent one by one on the
same connection pool) and ends when the last measured request ends; the
server's CPU (from /proc), this process's CPU and the machine's (/proc/stat) are
read at both ends, so the CPU that went to anything else shows (isolation.py).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import aiohttp

from scalellm.bench import isolation, procstat
from scalellm.bench.client import ClientConfig, RequestResult, make_session, send_request
from scalellm.bench.metrics import RunWindow

OnDone = Callable[[RequestResult], None]


@dataclass(frozen=True)
class LoadConfig:
    """The shape of one measured run."""

    concurrency: int
    num_requests: int
    request_rate: float = math.inf
    num_warmup: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests < 1:
            raise ValueError(f"the number of requests must be >= 1, got {self.num_requests}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (inf for a closed loop), got {self.request_rate}")
        if self.num_warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.num_warmup}")


def standard_num_requests(concurrency: int) -> int:
    """N = max(16, 4 C): the standard workload's request count."""
    return max(16, 4 * concurrency)


def poisson_offsets(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a seeded Poisson process; the first is 0."""
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for index in range(num_requests):
        if index:
            now += rng.expovariate(rate)
        offsets.append(now)
    return offsets


async def run_load(client: ClientConfig, load: LoadConfig, bodies: Sequence[bytes],
                   warmup_bodies: Sequence[bytes] = (), server_pids: Sequence[int] = (),
                   on_done: OnDone | None = None) -> tuple[list[RequestResult], RunWindow]:
    """Warm up, then send ``bodies`` under ``load``; return raw results and the window."""
    if len(bodies) != load.num_requests:
        raise ValueError(f"{load.num_requests} requests planned but {len(bodies)} bodies given")
    async with make_session(client, load.concurrency) as session:
        await _warm_up(session, client, warmup_bodies)
        server_before = procstat.tree_cpu_seconds(server_pids) if server_pids else None
        machine_before = isolation.machine_cpu()
        bench_before = time.process_time()
        start = time.perf_counter()
        if math.isinf(load.request_rate):
            results = await _closed_loop(session, client, load, bodies, on_done)
        else:
            results = await _open_loop(session, client, load, bodies, on_done)
        duration = time.perf_counter() - start
        bench_cpu = time.process_time() - bench_before
        server_cpu = None
        if server_before is not None:
            server_cpu = procstat.tree_cpu_seconds(server_pids) - server_before
        machine_after = isolation.machine_cpu()
    other_cpu = steal = None
    if machine_before and machine_after and server_cpu is not None:
        other_cpu = isolation.other_cpu_seconds(machine_before, machine_after, server_cpu, bench_cpu)
        steal = machine_after.steal_s - machine_before.steal_s
    window = RunWindow(duration_s=duration, server_cpu_s=server_cpu, bench_cpu_s=bench_cpu,
                       concurrency=load.concurrency, request_rate=load.request_rate,
                       other_cpu_s=other_cpu, steal_s=steal)
    return results, window


async def _warm_up(session: aiohttp.ClientSession, client: ClientConfig, bodies: Sequence[bytes]) -> None:
    for body in bodies:
        result = await send_request(session, client, body)
        if not result.success:
            raise RuntimeError(f"warm-up request to {client.url} failed: {result.error}")


async def _closed_loop(session: aiohttp.ClientSession, client: ClientConfig, load: LoadConfig,
                       bodies: Sequence[bytes], on_done: OnDone | None) -> list[RequestResult]:
    results: list[RequestResult | None] = [None] * len(bodies)
    indices = iter(range(len(bodies)))

    async def worker() -> None:
        for index in indices:  # one shared iterator: each index is taken exactly once
            results[index] = result = await send_request(session, client, bodies[index])
            if on_done:
                on_done(result)

    await asyncio.gather(*(worker() for _ in range(min(load.concurrency, len(bodies)))))
    return results  # type: ignore[return-value]


async def _open_loop(session: aiohttp.ClientSession, client: ClientConfig, load: LoadConfig,
                     bodies: Sequence[bytes], on_done: OnDone | None) -> list[RequestResult]:
    limit = asyncio.Semaphore(load.concurrency)

    async def one(body: bytes) -> RequestResult:
        async with limit:
            result = await send_request(session, client, body)
        if on_done:
            on_done(result)
        return result

    tasks = []
    start = time.perf_counter()
    for body, offset in zip(bodies, poisson_offsets(len(bodies), load.request_rate, load.seed)):
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body)))
    return list(await asyncio.gather(*tasks))
