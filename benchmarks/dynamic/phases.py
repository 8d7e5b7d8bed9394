"""Auto against the best fixed shape in each phase of a stepped run (`scalellm bench --load-steps`).

    python benchmarks/dynamic/phases.py benchmarks/dynamic/steps/results.json

Low-load phases (C < 16) are compared on E2E p50 (lower is better), high-load phases on output
tokens/s (higher is better); "settled" leaves out the first --settle seconds of each phase, the time
auto needs to notice the change and start the new shape.
"""

from __future__ import annotations

import json
import sys

HIGH_LOAD = 16


def phase_rows(document: dict, part: str) -> list[str]:
    steps = document["steps"]
    systems = list(dict.fromkeys(row["system"] for row in steps))
    fixed = [s for s in systems if not s.startswith("auto")]
    lines = []
    for index in sorted({row["step"] for row in steps}):
        by_system = {row["system"]: row for row in steps if row["step"] == index}
        concurrency = by_system[systems[0]]["concurrency"]
        key, higher = ("output_throughput", True) if concurrency >= HIGH_LOAD else ("median_e2el_ms", False)
        values = {s: (by_system[s].get(part) or {}).get(key) for s in systems if s in by_system}
        known = {s: v for s, v in values.items() if v is not None and s in fixed}
        if not known:
            continue
        best = (max if higher else min)(known, key=known.get)
        ratios = " | ".join(f"{values[s] / known[best]:.2f}" if values.get(s) is not None else "-"
                            for s in systems if s not in fixed)
        cells = " | ".join(f"{values[s]:.0f}" if values.get(s) is not None else "-" for s in systems)
        lines.append(f"| {index + 1} | {concurrency} | {'out tok/s' if higher else 'E2E p50 ms'} | {cells} | "
                     f"{best} | {ratios} |")
    return lines


def main(path: str) -> None:
    document = json.load(open(path))
    systems = list(dict.fromkeys(row["system"] for row in document["steps"]))
    autos = [s for s in systems if s.startswith("auto")]
    header = (f"| phase | C | metric | {' | '.join(systems)} | best fixed | "
              f"{' | '.join(f'{s} / best' for s in autos)} |\n|{'---|' * (len(systems) + 4 + len(autos))}")
    print(f"Whole phases:\n\n{header}\n" + "\n".join(phase_rows(document, "summary")))
    settle = document["config"].get("settle_s")
    if settle:
        print(f"\nSettled (from {settle:g} s into each phase):\n\n{header}\n" + "\n".join(phase_rows(document, "settled")))


if __name__ == "__main__":
    main(sys.argv[1])
