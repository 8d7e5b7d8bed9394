"""Write a benchmark's results: results.json (everything), results.md (tables), PNG plots.

results.json::

    {"config": {...},                     # the command line, resolved
     "systems": {name: {...}},            # how each system was reached or started
     "runs": [{"system", "concurrency", "repeat",
               "summary": {vllm-bench-serve keys..., "breakdown": [...]},
               "requests": [raw per-request measurements]}],
     "aggregates": [{"system", "concurrency", "repeats",
                     "metrics": {key: {"median", "min", "max"}}, "breakdown": [...]}],
     "ratios": [...]}                     # compare mode only
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


def write_json(path: Path, document: dict) -> None:
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def format_spread(stats: dict | None, fmt: str) -> str:
    """``median`` or ``median (min–max)`` when the repeats differ; '-' when absent."""
    if not stats:
        return "-"
    median = fmt.format(stats["median"])
    low, high = fmt.format(stats["min"]), fmt.format(stats["max"])
    return median if low == high else f"{median} ({low}–{high})"


def results_table(aggregates: Sequence[dict]) -> str:
    """One row per (system, concurrency): medians over repeats with their spread."""
    header = "| system | C | " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for row in aggregates:
        cells = [format_spread(row["metrics"].get(key), fmt) for _, key, fmt in TABLE_COLUMNS]
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
