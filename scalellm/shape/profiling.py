"""`scalellm profile [MODEL]`: measure every deployment shape with the bench, write the profile.

For each shape (default: every feasible shape of this machine) the profiler starts
`scalellm serve --shape RxP` with the given engine flags on a free port, runs the bench's closed loop
at each concurrency (the bench's own requests, warm-up and seeds), and stops it. It writes:

    FILE                 the profile (see profile.py), read by `serve --shape auto --profile FILE`
    FILE.png             output tokens/s and E2E p50 against concurrency, one line per shape
    FILE-bench/          the bench's report of the same runs (results.json, results.md, plots)
    FILE-bench/logs/     each shape's serve log
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

from scalellm.shape.profile import Profile, ProfilePoint, ShapeProfile, plot_profile
from scalellm.shape.shape import Machine, Shape


def shape_list(text: str) -> tuple[Shape, ...]:
    """argparse type: ``"1x2,2x1"`` -> (Shape(1, 2), Shape(2, 1))."""
    try:
        shapes = tuple(Shape.parse(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not shapes:
        raise argparse.ArgumentTypeError("expected shapes like 1x2,2x1")
    return shapes


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `scalellm profile`: the engine's, the shapes and the workload."""
    from scalellm.bench.cli import concurrency_list
    from scalellm.replica.launch import add_engine_args

    add_engine_args(parser, exclude=("seed",))  # --seed seeds the prompts here
    group = parser.add_argument_group("profile")
    group.add_argument("--shapes", type=shape_list, default=None, metavar="RxP,...",
                       help="shapes to measure (default: every feasible one, e.g. 1x2,2x1 on 2 cores)")
    group.add_argument("--concurrency", type=concurrency_list, default=(1, 4, 16, 64), metavar="C,...",
                       help="requests in flight to measure each shape at (default 1,4,16,64)")
    group.add_argument("--requests", type=int, default=None, metavar="N",
                       help="measured requests per point (default max(16, 4C))")
    group.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per point (default 1)")
    group.add_argument("--warmup", type=int, default=2, metavar="N", help="warm-up requests per point (default 2)")
    group.add_argument("--input-len", type=int, default=48, metavar="N", help="words per prompt (default 48)")
    group.add_argument("--output-len", type=int, default=64, metavar="N", help="max_tokens (default 64)")
    group.add_argument("--seed", type=int, default=0, help="seed of the prompts (default 0)")
    group.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                       help="seconds serve may take to start (default %(default)s)")
    group.add_argument("--output", type=Path, default=Path("profile.json"), metavar="FILE",
                       help="the profile to write (default %(default)s); FILE.png and FILE-bench/ beside it")


def serve_command(args: argparse.Namespace, shape: Shape) -> str:
    """The bench launch template of `scalellm serve` in `shape` with the engine flags of `args`."""
    from scalellm.replica.launch import engine_flags, replica_config_from_args

    engine = shlex.join(engine_flags(replica_config_from_args(args)))
    return (f"{shlex.quote(sys.executable)} -m scalellm.cli serve --port {{port}} --shape {shape.label} "
            f"--no-request-log {engine}")


def run_profile(args: argparse.Namespace) -> int:
    """Measure, write the profile, its plot and the bench report; 0 on success, 1 when a run failed."""
    from scalellm.bench.client import ClientConfig
    from scalellm.bench.progress import ProgressLine
    from scalellm.bench.report import write_report
    from scalellm.bench.runner import BenchPlan, aggregate_points, results_document

    if args.num_threads is not None or getattr(args, "tensor_parallel_size", 1) != 1:
        raise ValueError("the shapes set each replica's parallelism: leave out --num-threads and "
                         "--tensor-parallel-size")
    machine = Machine.detect()
    shapes = args.shapes or tuple(machine.feasible_shapes())
    plan = BenchPlan(concurrencies=tuple(args.concurrency), num_requests=args.requests, repeats=args.repeat,
                     num_warmup=args.warmup, input_len=args.input_len, output_len=args.output_len,
                     seed=args.seed)
    client = ClientConfig(base_url="http://127.0.0.1", model="")
    bench_dir = args.output.with_name(args.output.stem + "-bench")
    systems, points = {}, []
    for shape in shapes:
        systems[shape.label], measured = _measure_shape(args, shape, client, plan, bench_dir, ProgressLine(0))
        points += measured
    workload = (f"chat, {plan.input_len} random words, max_tokens {plan.output_len}, ignore_eos, streamed, "
                f"closed loop, N = {plan.num_requests or 'max(16, 4C)'} per point, {plan.repeats} repeat(s)")
    document = results_document({"workload": workload, "argv": sys.argv}, systems, points)
    write_report(bench_dir, document)
    profile = profile_from_aggregates(aggregate_points(points), machine, workload,
                                      model=next((info.get("model", "") for info in systems.values()), ""))
    profile.save(args.output)
    plot_profile(profile, args.output.with_suffix(".png"))
    print(f"wrote {args.output}, {args.output.with_suffix('.png')} and {bench_dir}/")
    failed = sum(point.summary["failed"] for point in points)
    return 1 if failed else 0


def _measure_shape(args, shape: Shape, client, plan, bench_dir: Path, progress) -> tuple[dict, list]:
    from dataclasses import replace

    from scalellm.bench.modelinfo import discover_model
    from scalellm.bench.peers import LaunchSpec, RunningSystem
    from scalellm.bench.runner import run_plan

    spec = LaunchSpec(shape.label, serve_command(args, shape), startup_timeout_s=args.startup_timeout)
    log_path = bench_dir / "logs" / f"{shape.label}.log"
    with RunningSystem(spec, Path("-"), log_path) as running:
        print(f"[profile] {shape.label}: {' '.join(running.argv)}", file=sys.stderr, flush=True)
        running.wait_ready()
        model = discover_model(running.base_url)
        shape_client = replace(client, base_url=running.base_url, model=model)
        points = run_plan(shape.label, shape_client, plan, [running.process.pid], progress)
    return {"command": spec.command, "argv": running.argv, "log": str(log_path), "model": model}, points


def profile_from_aggregates(aggregates: list[dict], machine: Machine, workload: str, model: str) -> Profile:
    """The profile of the bench's aggregates (system = shape label; medians over repeats)."""
    by_shape: dict[str, list[ProfilePoint]] = {}
    for row in aggregates:
        summary = {key: stats["median"] for key, stats in row["metrics"].items()}
        by_shape.setdefault(row["system"], []).append(ProfilePoint.from_summary(row["concurrency"], summary))
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Profile(tuple(ShapeProfile(Shape.parse(label), tuple(points)) for label, points in by_shape.items()),
                   model=model, device=machine.device, num_units=machine.num_units, workload=workload,
                   created=created)
