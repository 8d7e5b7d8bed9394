"""Run the measurement plan (concurrencies x repeats) against one running system.

Every point draws its own requests from a seed derived from (seed,
concurrency, repeat): two systems measured at the same point get the same
prompts, while no point reuses the prompts of another (a prefix cache would
otherwise turn repeats into cache hits).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

from scalellm.bench import datasets
from scalellm.bench.breakdown import breakdown_table
from scalellm.bench.client import ClientConfig, RequestResult, build_body
from scalellm.bench.loadgen import LoadConfig, run_load, standard_num_requests
from scalellm.bench.metrics import aggregate_repeats, summarize
from scalellm.bench.progress import ProgressLine


@dataclass(frozen=True)
class BenchPlan:
    """What to measure at every point; ``num_requests`` None means max(16, 4 C)."""

    concurrencies: tuple[int, ...] = (1, 16, 64)
    num_requests: int | None = None
    repeats: int = 1
    num_warmup: int = 2
    request_rate: float = math.inf
    dataset: str = "random"
    input_len: int = 48
    output_len: int = 64
    seed: int = datasets.DEFAULT_SEED
    slos: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.concurrencies or min(self.concurrencies) < 1:
            raise ValueError(f"--concurrency needs positive integers, got {self.concurrencies}")
        if self.repeats < 1:
            raise ValueError(f"--repeat must be >= 1, got {self.repeats}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.num_requests}")

    def requests_at(self, concurrency: int) -> int:
        return self.num_requests or standard_num_requests(concurrency)


@dataclass
class PointResult:
    """One measured run: a system at one concurrency, one repeat."""

    system: str
    concurrency: int
    repeat: int
    summary: dict
    requests: list[RequestResult]

    def to_json(self) -> dict:
        return {"system": self.system, "concurrency": self.concurrency, "repeat": self.repeat,
                "summary": self.summary, "requests": [asdict(r) for r in self.requests]}


def run_async(coroutine):
    """Run a coroutine on uvloop when it is installed (a cheaper client), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is None or not hasattr(asyncio, "Runner"):  # asyncio.Runner is Python 3.11+
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def point_requests(plan: BenchPlan, concurrency: int, repeat: int) -> list[datasets.RequestSpec]:
    """Warm-up plus measured requests for one point (warm-up first)."""
    count = plan.num_warmup + plan.requests_at(concurrency)
    point_seed = plan.seed * 1_000_003 + concurrency * 1_009 + repeat
    if plan.dataset == "random":
        return datasets.random_requests(count, plan.input_len, plan.output_len, point_seed)
    return datasets.cycle_to(datasets.load_jsonl(plan.dataset, plan.output_len), count)


def run_point(system: str, client: ClientConfig, plan: BenchPlan, concurrency: int, repeat: int,
              server_pids: Sequence[int] = (), progress: ProgressLine | None = None) -> PointResult:
    """Measure one point and summarize it."""
    specs = point_requests(plan, concurrency, repeat)
    bodies = [build_body(spec, client) for spec in specs]
    warmup, measured = bodies[: plan.num_warmup], bodies[plan.num_warmup:]
    load = LoadConfig(concurrency=concurrency, num_requests=len(measured),
                      request_rate=plan.request_rate, num_warmup=plan.num_warmup, seed=plan.seed + repeat)
    if progress:
        progress.restart(len(measured), f"{system} C={concurrency} #{repeat + 1}")
    results, window = run_async(run_load(client, load, measured, warmup, server_pids,
                                         progress.update if progress else None))
    if progress:
        progress.close()
    summary = summarize(results, window, plan.slos)
    summary["breakdown"] = breakdown_table(results)
    return PointResult(system, concurrency, repeat, summary, results)


def run_plan(system: str, client: ClientConfig, plan: BenchPlan, server_pids: Sequence[int] = (),
             progress: ProgressLine | None = None) -> list[PointResult]:
    """Every concurrency, each repeated ``plan.repeats`` times, repeats innermost."""
    return [run_point(system, client, plan, concurrency, repeat, server_pids, progress)
            for concurrency in plan.concurrencies for repeat in range(plan.repeats)]


def aggregate_points(points: Sequence[PointResult]) -> list[dict]:
    """Median and min-max over repeats, per (system, concurrency), in first-seen order."""
    groups: dict[tuple[str, int], list[PointResult]] = {}
    for point in points:
        groups.setdefault((point.system, point.concurrency), []).append(point)
    rows = []
    for (system, concurrency), members in groups.items():
        all_requests = [r for p in members for r in p.requests]
        rows.append({"system": system, "concurrency": concurrency, "repeats": len(members),
                     "metrics": aggregate_repeats([p.summary for p in members]),
                     "breakdown": breakdown_table(all_requests)})
    return rows


def results_document(config: dict, systems: dict, points: Sequence[PointResult],
                     ratios: list[dict] | None = None) -> dict:
    """Everything a report needs, in the layout documented in report.py."""
    return {"config": config, "systems": systems, "runs": [p.to_json() for p in points],
            "aggregates": aggregate_points(points), "ratios": ratios or []}
