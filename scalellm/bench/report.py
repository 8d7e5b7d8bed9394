"""Write a benchmark's results: results.json (everything), results.md (tables), PNG plots.

results.json::

    {"config": {...},                     # the command line, resolved
     "systems": {name: {...}},            # how each system was reached or started
     "runs": [{"system", "concurrency", "repeat",
               "summary": {vllm-bench-serve keys..., "breakdown": [...]},
               "requests": [raw per-request measurements]}],
     "aggregates": [{"system", "concurrency", "repeats",
                     "metrics": {key: {"median", "min", "max"}}, "breakdown": [...]}],
     "ratios": [...],                     # compare mode only
     "roofline": {"facts", "systems": {name: {"weights", "why", "weight_bytes"}}, "machine"}}

results.md adds, per (system, concurrency), the roofline (achieved GB/s and GFLOP/s
and their fractions of the machine probe), the ITL of streams while another
request waits for its first token, and how alone the system was (CPU that went
elsewhere, hypervisor steal); then how each system ran (build, environment, CPUs)
and, with --verify-peer, the peer's own tool beside our client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import orjson

from scalellm.bench.breakdown import breakdown_markdown

# (column title, metric key, number format)
TABLE_COLUMNS = (
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("req/s", "request_throughput", "{:.2f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TTFT p99 ms", "p99_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("ITL p50 ms", "median_itl_ms", "{:.1f}"),
    ("E2E p50 ms", "median_e2el_ms", "{:.0f}"),
    ("E2E p99 ms", "p99_e2el_ms", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
    ("server CPU ms/req", "server_cpu_ms_per_request", "{:.1f}"),
    ("bench CPU ms/req", "bench_cpu_ms_per_request", "{:.2f}"),
)


ROOFLINE_COLUMNS = (
    ("weights GB/s", "roofline_achieved_gb_s", "{:.2f}"),
    ("of read BW", "roofline_bandwidth_fraction", "{:.0%}"),
    ("GFLOP/s", "roofline_achieved_gflop_s", "{:.1f}"),
    ("of matmul peak", "roofline_compute_fraction", "{:.1%}"),
    ("passes/s", "roofline_steps_per_s", "{:.1f}"),
    ("ITL p99 ms", "p99_itl_ms", "{:.1f}"),
    ("ITL p99 during others' prefill", "p99_itl_during_prefill_ms", "{:.1f}"),
    ("other CPU (cores)", "other_cpu_share", "{:.2f}"),
    ("steal s", "steal_cpu_seconds", "{:.1f}"),
)


def write_json(path: Path, document: dict) -> None:
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def format_spread(stats: dict | None, fmt: str) -> str:
    """``median`` or ``median (min–max)`` when the repeats differ; '-' when absent."""
    if not stats:
        return "-"
    median = fmt.format(stats["median"])
    low, high = fmt.format(stats["min"]), fmt.format(stats["max"])
    return median if low == high else f"{median} ({low}–{high})"


def results_table(aggregates: Sequence[dict], columns: Sequence[tuple] = TABLE_COLUMNS) -> str:
    """One row per (system, concurrency): medians over repeats with their spread."""
    header = "| system | C | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for row in aggregates:
        cells = [format_spread(row["metrics"].get(key), fmt) for _, key, fmt in columns]
        lines.append(f"| {row['system']} | {row['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios_table(ratios: Sequence[dict]) -> str:
    """Baseline / peer ratios (Markdown), '' when there are none."""
    if not ratios:
        return ""
    lines = ["| baseline vs peer | C | out tok/s × | TTFT p50 × | E2E p50 × | server CPU/req × |",
             "|---|---|---|---|---|---|"]
    for row in ratios:
        cells = [_ratio_cell(row.get(key)) for key in
                 ("output_throughput", "median_ttft_ms", "median_e2el_ms", "server_cpu_ms_per_request")]
        lines.append(f"| {row['baseline']} vs {row['peer']} | {row['concurrency']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def errors_section(runs: Sequence[dict]) -> str:
    """The first errors of every run that had failures."""
    lines = []
    for run in runs:
        for error in run["summary"].get("errors", []):
            lines.append(f"- {run['system']} C={run['concurrency']} #{run['repeat'] + 1}: `{error}`")
    return "\n".join(lines)


def roofline_section(document: dict) -> list[str]:
    """The roofline, ITL-during-prefill and isolation table, with the assumptions behind it."""
    info = document.get("roofline") or {}
    parts = ["", "## Roofline, prefill stalls and isolation", ""]
    if "skipped" in info:
        parts += [f"Roofline skipped: {info['skipped']}.", ""]
    else:
        machine = info.get("machine")
        if isinstance(machine, dict):
            peaks = ", ".join(f"{d} {v:.0f}" for d, v in machine["peak_gflop_s"].items())
            parts += [f"Machine ({machine['cpu']}, {machine['cores']} cores, probed {machine['probed_at']}): "
                      f"streaming read {machine['read_gb_s']:.1f} GB/s, matmul peak GFLOP/s {peaks}; oneDNN "
                      f"kernels {', '.join(machine['onednn_kernels']) or '-'}.", ""]
        elif machine:
            parts += [f"Fractions left out: {machine}.", ""]
        for name, row in (info.get("systems") or {}).items():
            parts.append(f"- {name}: weights as {row['weights']} ({row['weight_bytes'] / 1e6:.0f} MB a forward "
                         f"pass), {row['why']}")
        parts += ["", "Weights GB/s = (forward passes seen x weight bytes + KV bytes read) / duration; GFLOP/s "
                  "counts prompt and output tokens; see scalellm/bench/roofline.py.", ""]
    parts += ["Other CPU: cores busy on average with anything but the server and the bench during the run "
              "(a fair run is near 0); steal: CPU seconds the hypervisor took.", "",
              results_table(document["aggregates"], ROOFLINE_COLUMNS)]
    return parts


def systems_section(systems: dict) -> list[str]:
    """How every system ran: command, build, environment removed and used, CPUs allowed, peer check."""
    from scalellm.bench.verify import check_table

    parts, checks = [], []
    for name, info in systems.items():
        if "error" in info:
            continue
        lines = [f"- command: `{' '.join(info.get('argv') or [])}`" if info.get("argv") else ""]
        if info.get("build"):
            lines.append(f"- build: {' '.join(info['build'].get('cmake_options', []))} "
                         f"(targets {', '.join(info['build'].get('targets', []))})")
        if "cpus_allowed" in info:
            lines.append(f"- CPUs allowed: {info['cpus_allowed']}; environment removed: "
                         f"{', '.join(info.get('env_removed') or []) or 'nothing'}; set: "
                         f"{', '.join(f'{k}={v}' for k, v in (info.get('env') or {}).items()) or 'nothing'}")
        if info.get("memory_available_gib_at_start") is not None:
            lines.append(f"- memory available at its start: {info['memory_available_gib_at_start']:.1f} GiB")
        if info.get("other_servers_at_start"):
            lines.append(f"- NOT ALONE: other servers alive at its start: {'; '.join(info['other_servers_at_start'])}")
        for note in info.get("log_notes") or []:
            lines.append(f"- log: `{note}`")
        checks += info.get("peer_check") or []
        if any(lines):
            parts += ["", f"## How {name} ran", ""] + [line for line in lines if line]
    if checks:
        parts += ["", "## Peer check: our client against the peer's own benchmark tool (same server, same prompts)",
                  "", check_table(checks)]
    return parts


def render_markdown(document: dict) -> str:
    """results.md: settings, the main table, ratios, breakdowns and errors."""
    config = document.get("config", {})
    parts = ["# Benchmark results", "",
             f"Workload: {config.get('workload', '')}", "",
             "Medians over repeats, (min–max) when they differ. Latencies in ms; CPU in ms per "
             "completed request (server: all its processes from /proc).", "",
             results_table(document["aggregates"])]
    if document.get("ratios"):
        parts += ["", "## Ratios (baseline / peer; > 1 means the baseline is higher)", "",
                  ratios_table(document["ratios"])]
    parts += roofline_section(document)
    parts += systems_section(document.get("systems", {}))
    for row in document["aggregates"]:
        table = breakdown_markdown(row.get("breakdown") or [])
        if table:
            parts += ["", f"## Latency breakdown: {row['system']}, C={row['concurrency']}", "", table]
    for name, info in document.get("systems", {}).items():
        if "error" in info:
            parts += ["", f"## Not measured: {name}", "", "```", info["error"].strip()[-1500:], "```"]
    errors = errors_section(document.get("runs", []))
    if errors:
        parts += ["", "## Errors (first few per run)", "", errors]
    return "\n".join(parts) + "\n"


def write_report(output_dir: Path, document: dict) -> list[Path]:
    """results.json, results.md and the plots under ``output_dir``; return the files written."""
    from scalellm.bench.plots import write_plots  # matplotlib is imported only when reporting

    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    write_json(json_path, document)
    md_path.write_text(render_markdown(document))
    return [json_path, md_path, *write_plots(output_dir, document)]
