"""``scalellm bench --load-steps``: run a stepped load on one server or on each compared system."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

from scalellm.bench import datasets
from scalellm.bench.client import ClientConfig, build_body
from scalellm.bench.runner import BenchPlan, run_async
from scalellm.bench.steps import LoadStep, run_steps, summarize_steps, timeline
from scalellm.bench.steps_report import steps_document, steps_table, write_steps_report


@dataclass
class StepsResult:
    """One system's stepped run, summarized."""

    system: str
    rows: list[dict]
    timeline: list[dict]
    shapes: list


def body_source(plan: BenchPlan, client: ClientConfig) -> Callable[[int], bytes]:
    """Request n's body: fresh random words seeded by n, or the dataset's n-th line, cycled."""
    if plan.dataset != "random":
        specs = datasets.load_jsonl(plan.dataset, plan.output_len)
        bodies = [build_body(spec, client) for spec in specs]
        return lambda n: bodies[n % len(bodies)]
    return lambda n: build_body(datasets.random_requests(1, plan.input_len, plan.output_len,
                                                         plan.seed * 1_000_003 + n)[0], client)


def measure_steps(args: argparse.Namespace, plan: BenchPlan) -> Callable[[str, ClientConfig, list[int]], list]:
    """The measure function of one system (for `compare.measure_system` or a single server)."""
    steps: tuple[LoadStep, ...] = args.load_steps

    def measure(system: str, client: ClientConfig, server_pids: list[int]) -> list[StepsResult]:
        make_body = body_source(plan, client)
        warmup = [make_body(-1 - i) for i in range(plan.num_warmup)]
        total = sum(step.duration_s for step in steps)
        print(f"[steps] {system}: {','.join(f'{s.concurrency}:{s.duration_s:g}' for s in steps)} "
              f"({total:.0f} s)", file=sys.stderr, flush=True)
        run = run_async(run_steps(client, steps, make_body, warmup))
        return [StepsResult(system, summarize_steps(run, steps, args.settle), timeline(run, steps), run.shapes)]

    return measure


def finish_steps(args: argparse.Namespace, plan: BenchPlan, systems: dict, results: list[StepsResult]) -> int:
    """Write the report, print the table; 1 when a request failed or a system was not measured."""
    steps = ",".join(f"{s.concurrency}:{s.duration_s:g}" for s in args.load_steps)
    prompts = (f"{plan.input_len} random words" if plan.dataset == "random" else f"dataset {plan.dataset}")
    config = {"workload": f"{args.endpoint}, {prompts}, max_tokens {plan.output_len}, ignore_eos "
                          f"{args.ignore_eos}, {'streamed' if args.stream else 'not streamed'}, closed loop "
                          f"stepped {steps} (concurrency:seconds), {plan.num_warmup} warm-up",
              "argv": sys.argv, "load_steps": steps, "settle_s": args.settle}
    document = steps_document(config, systems, {r.system: (r.rows, r.timeline, r.shapes) for r in results})
    files = write_steps_report(args.output, document)
    print(steps_table(document["steps"]))
    print("\nwrote " + ", ".join(str(f) for f in files))
    failed = sum(row["summary"]["failed"] for row in document["steps"])
    missing = [name for name, info in systems.items() if "error" in info]
    return 1 if failed or missing or not results else 0
