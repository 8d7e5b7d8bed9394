"""Summarize benchmarks/gateway/ab.sh: each system's median over the interleaved repeats, with the spread;
then the router CPU per request as ratios taken within each repeat (against vllm-router, and each
scalellm variant against the first), which a machine whose load drifts between repeats moves less.

    python benchmarks/gateway/ab_summarize.py OUT SYSTEM...    # OUT holds SYSTEM-MODE-rN/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = (("router CPU ms/req", "server_cpu_ms_per_request", 3), ("E2E p50 ms", "median_e2el_ms", 1),
           ("E2E p99 ms", "p99_e2el_ms", 1), ("TTFT p50 ms", "median_ttft_ms", 1), ("req/s", "request_throughput", 0))


def repeats(out: Path, system: str, mode: str, key: str) -> list[float]:
    """The metric of every repeat of (system, mode), in repeat order."""
    values = []
    for path in sorted(out.glob(f"{system}-{mode}-r*/results.json"), key=lambda p: int(p.parent.name.rsplit("-r", 1)[1])):
        metric = json.loads(path.read_text())["aggregates"][0]["metrics"].get(key)
        if metric is not None and metric.get("median") is not None:
            values.append(metric["median"])
    return values


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def main(out: Path, systems: list[str]) -> None:
    lines = []
    for mode in ("stream", "no-stream"):
        lines += [f"### {'streamed' if mode == 'stream' else 'non-streamed'}", "",
                  "| system | " + " | ".join(name for name, _, _ in COLUMNS) + " | added E2E p50 ms | failed |",
                  "|---|" + "---|" * (len(COLUMNS) + 2)]
        direct = repeats(out, "direct", mode, "median_e2el_ms")
        for system in systems:
            cells = [cell(repeats(out, system, mode, key), digits) if not (system == "direct" and key.startswith(
                "server")) else "–" for _, key, digits in COLUMNS]
            e2e = repeats(out, system, mode, "median_e2el_ms")
            added = f"{statistics.median(e2e) - statistics.median(direct):+.1f}" if direct and e2e and \
                system != "direct" else "–"
            failed = max(repeats(out, system, mode, "failed"), default=0)
            lines.append(f"| {system} | " + " | ".join(cells) + f" | {added} | {failed:.0f} |")
        lines.append("")
        lines += ratio_lines(out, systems, mode)
    print("\n".join(lines))


def ratio_lines(out: Path, systems: list[str], mode: str) -> list[str]:
    """Router CPU per request over another system's in the same repeat: median (range) over repeats."""
    key = "server_cpu_ms_per_request"
    variants = [system for system in systems if system not in ("direct", "vllm-router")]
    pairs = [(system, "vllm-router") for system in variants if "vllm-router" in systems]
    pairs += [(system, variants[0]) for system in variants[1:]]
    lines = []
    for system, base in pairs:
        ratios = [a / b for a, b in zip(repeats(out, system, mode, key), repeats(out, base, mode, key)) if b]
        if ratios:
            lines.append(f"- CPU per request, {system} / {base} within each repeat: {cell(ratios, 2)}")
    return lines + [""] if lines else []


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
