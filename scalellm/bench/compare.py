"""Compare mode: start each system in turn, run the same plan on it, report side by side.

For every system: install it if needed, check that no other server is alive
(isolation.py; a leftover refuses the start unless ``allow_other_servers``),
start it on a free port (log under OUTPUT/logs/NAME.log) with the thread and
affinity settings of the bench's shell removed, wait until its readiness path
answers, learn its model name from /v1/models, run every (concurrency, repeat)
point with its process tree's CPU measured from /proc, and stop it together with
every process it started. What it ran with (environment, allowed CPUs, build)
is recorded. A system that cannot be installed or started is recorded with its
error and the others still run. Ratios compare the baseline (``scalellm`` by
default) with every other system, point by point.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from scalellm.bench import isolation
from scalellm.bench.client import ClientConfig
from scalellm.bench.modelinfo import model_entry
from scalellm.bench.peers import SYSTEMS, LaunchSpec, PeerOptions, RunningSystem, prepare_system
from scalellm.bench.progress import ProgressLine
from scalellm.bench.runner import BenchPlan, PointResult, run_plan

RATIO_KEYS = ("output_throughput", "median_ttft_ms", "median_e2el_ms", "server_cpu_ms_per_request")
MODEL_LIST_WAIT_S = 60.0
"""How long a started system may list no model after its health check passes."""


def check_systems(names: Sequence[str], custom: dict[str, str]) -> list[str]:
    """Validate the system names up front (ValueError for an unknown one)."""
    if not names:
        raise ValueError("--systems needs at least one system")
    unknown = [n for n in names if n not in SYSTEMS and n not in custom]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}: use {', '.join(SYSTEMS)} or define one "
                         "with --system-cmd NAME='COMMAND --port {port}'")
    return list(names)


Measure = Callable[[str, ClientConfig, list[int]], list]
"""measure(system, client, server_pids) -> results; the default runs the plan's points (run_plan)."""


def measure_system(spec: LaunchSpec, options: PeerOptions, client: ClientConfig, plan: BenchPlan,
                   output_dir: Path, progress: ProgressLine | None,
                   measure: Measure | None = None, allow_other_servers: bool = False,
                   verify_peer: bool = False) -> tuple[dict, list]:
    """Start one prepared system alone, measure the plan on it (or run `measure`), stop it."""
    info: dict = {"command": spec.command, "env": spec.env, "keepalive": spec.keepalive and client.keepalive,
                  **spec.details}
    if not allow_other_servers:
        isolation.check_alone(spec.name)
    others = isolation.leftover_servers()
    info["memory_available_gib_at_start"] = isolation.memory_available_gib()
    info["other_servers_at_start"] = [f"{p.pid} {p.family}: {p.cmdline}" for p in others]
    log_path = output_dir / "logs" / f"{spec.name}.log"
    with RunningSystem(spec, options.gguf, log_path) as running:
        info.update(argv=running.argv, log=str(log_path), **running.describe())
        print(f"[compare] starting {spec.name}: {' '.join(running.argv)}", file=sys.stderr, flush=True)
        running.wait_ready()
        entry = model_entry(running.base_url, client.api_key, wait_s=MODEL_LIST_WAIT_S)
        model = client.model or str(entry["id"])
        info.update(model=model, weight_format=entry.get("weight_format"))
        system_client = replace(client, base_url=running.base_url, model=model,
                                keepalive=spec.keepalive and client.keepalive)
        info["log_notes"] = log_notes(log_path)
        if measure is not None:
            return info, measure(spec.name, system_client, [running.process.pid])
        points = run_plan(spec.name, system_client, plan, [running.process.pid], progress)
        if verify_peer and "python" in spec.details:  # the built-in vLLM: its own client is in its venv
            info["peer_check"] = check_with_own_tool(spec, system_client, plan, points, output_dir)
    return info, points


LOG_NOTE_MARKERS = ("thread binding", "core ids", "reserved_cpus", "Torch threads", "system_info", "n_threads",
                    "CPU KV cache size", "ScaleLLM serving", "quantization auto")


def log_notes(log_path: Path, max_lines: int = 20) -> list[str]:
    """The lines of a server's start-up log that say how it runs (threads, binding, ISA, cache)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:300] for line in lines if any(m in line for m in LOG_NOTE_MARKERS)][:max_lines]


def check_with_own_tool(spec: LaunchSpec, client: ClientConfig, plan: BenchPlan, points: list,
                        output_dir: Path) -> list[dict]:
    """Per concurrency: our client's medians beside ``vllm bench serve``'s on the same server."""
    from scalellm.bench.peer_install import ensure_vllm_bench_client
    from scalellm.bench.verify import OWN_TOOL_KEYS, run_vllm_bench

    ensure_vllm_bench_client(Path(spec.details["python"]))
    rows = []
    for concurrency in plan.concurrencies:
        print(f"[compare] {spec.name} C={concurrency}: vllm bench serve on the same prompts", file=sys.stderr,
              flush=True)
        own = run_vllm_bench(Path(spec.details["python"]), Path(spec.details["model_dir"]), client.base_url,
                             client.model, plan, concurrency, output_dir)
        summaries = [p.summary for p in points if p.concurrency == concurrency]
        ours = {key: statistics.median(s[key] for s in summaries) for key in OWN_TOOL_KEYS}
        rows.append({"system": spec.name, "concurrency": concurrency, "ours": ours, "own": own})
    return rows


def run_compare(names: Sequence[str], custom: dict[str, str], options: PeerOptions, client: ClientConfig,
                plan: BenchPlan, output_dir: Path, progress: ProgressLine | None = None,
                measure: Measure | None = None, allow_other_servers: bool = False,
                verify_peer: bool = False) -> tuple[dict, list]:
    """Measure every system; return per-system info and all results (points, or what `measure` returns)."""
    systems: dict[str, dict] = {}
    points: list[PointResult] = []
    for name in check_systems(names, custom):
        try:
            spec = prepare_system(name, options, custom)
            systems[name], measured = measure_system(spec, options, client, plan, output_dir, progress, measure,
                                                     allow_other_servers, verify_peer)
            points += measured
        except (RuntimeError, OSError) as error:
            print(f"[compare] {name} skipped: {error}", file=sys.stderr, flush=True)
            systems[name] = {"error": str(error)}
    return systems, points


def compute_ratios(aggregates: Sequence[dict], baseline: str) -> list[dict]:
    """baseline / peer of each RATIO_KEYS median, for every concurrency both measured."""
    by_point = {(row["system"], row["concurrency"]): row["metrics"] for row in aggregates}
    ratios = []
    for (system, concurrency), metrics in by_point.items():
        base = by_point.get((baseline, concurrency))
        if system == baseline or base is None:
            continue
        row: dict = {"baseline": baseline, "peer": system, "concurrency": concurrency}
        for key in RATIO_KEYS:
            row[key] = _ratio(base.get(key), metrics.get(key))
        ratios.append(row)
    return ratios


def _ratio(base: dict | None, peer: dict | None) -> float | None:
    if not base or not peer or not peer["median"]:
        return None
    return base["median"] / peer["median"]
