"""Summarize benchmarks/gateway/run.sh: router CPU per request and latency added over `direct`.

    python benchmarks/gateway/summarize.py OUT      # OUT holds SYSTEM-stream/ and SYSTEM-no-stream/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SYSTEMS = ("direct", "vllm-router", "scalellm")


def median_and_spread(aggregate: dict, key: str) -> tuple[float, float, float] | None:
    value = aggregate["metrics"].get(key)
    if value is None or value.get("median") is None:
        return None
    return value["median"], value["min"], value["max"]


def load(out: Path, system: str, mode: str) -> dict | None:
    path = out / f"{system}-{mode}" / "results.json"
    if not path.exists():
        return None
    aggregates = json.loads(path.read_text())["aggregates"]
    return aggregates[0] if aggregates else None


def fmt(triple: tuple[float, float, float] | None, unit: str = "", digits: int = 2) -> str:
    if triple is None:
        return "–"
    median, low, high = triple
    return f"{median:.{digits}f}{unit} ({low:.{digits}f}–{high:.{digits}f})"


def main(out: Path) -> None:
    lines = []
    for mode in ("stream", "no-stream"):
        rows = {system: load(out, system, mode) for system in SYSTEMS}
        direct = rows.get("direct")
        lines += [f"### {'streamed' if mode == 'stream' else 'non-streamed'}", "",
                  "| system | router CPU ms/req | E2E p50 ms | added E2E p50 ms | TTFT p50 ms | added TTFT p50 ms | req/s | failed |",
                  "|---|---|---|---|---|---|---|---|"]
        for system, row in rows.items():
            if row is None:
                lines.append(f"| {system} | not measured | | | | | | |")
                continue
            cpu = median_and_spread(row, "server_cpu_ms_per_request")
            e2e, ttft = median_and_spread(row, "median_e2el_ms"), median_and_spread(row, "median_ttft_ms")
            added_e2e = added_ttft = "–"
            if direct is not None and system != "direct":
                added_e2e = f"{e2e[0] - median_and_spread(direct, 'median_e2el_ms')[0]:+.1f}"
                added_ttft = f"{ttft[0] - median_and_spread(direct, 'median_ttft_ms')[0]:+.1f}"
            failed = row["metrics"]["failed"]["max"]
            lines.append(f"| {system} | {fmt(cpu, digits=2) if system != 'direct' else '–'} | {fmt(e2e, digits=1)} | "
                         f"{added_e2e} | {fmt(ttft, digits=1)} | {added_ttft} | "
                         f"{fmt(median_and_spread(row, 'request_throughput'), digits=0)} | {failed} |")
        lines.append("")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/gateway/results"))
