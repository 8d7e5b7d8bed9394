"""The soak's verdict and report: stress.json (everything), stress.md (the tables), stress_rss.png.

Resident memory is judged on the second half of the load (the first half includes warm-up: allocator
arenas, the prefix cache and gRPC buffers reaching their working size). A process is "flat" when its
RSS grew by less than max(5 %, 32 MiB) between the middle and the end of the load.
"""

from __future__ import annotations

import json
from pathlib import Path

FLAT_FRACTION = 0.05
FLAT_MIB = 32.0


def rss_series(samples: list[dict], load_seconds: float) -> dict[str, list[tuple[float, float]]]:
    """name -> [(t, MiB)] over the load window."""
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        if sample["t"] > load_seconds + 1e-6:
            continue
        for name, mib in sample["rss_mib"].items():
            series.setdefault(name, []).append((sample["t"], mib))
    return series


def _slope_mib_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(points) < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return 60.0 * cov / var if var else 0.0


def rss_summary(samples: list[dict], load_seconds: float) -> dict[str, dict]:
    """Per process: MiB at start, middle, end and max of the load, second-half growth and slope."""
    summary = {}
    for name, points in rss_series(samples, load_seconds).items():
        middle = min(points, key=lambda p: abs(p[0] - load_seconds / 2))
        second_half = [p for p in points if p[0] >= middle[0]]
        growth = points[-1][1] - middle[1]
        summary[name] = {"start_mib": points[0][1], "middle_mib": middle[1], "end_mib": points[-1][1],
                         "max_mib": max(v for _, v in points), "second_half_growth_mib": round(growth, 1),
                         "second_half_slope_mib_per_min": round(_slope_mib_per_min(second_half), 2),
                         "flat": growth < max(FLAT_FRACTION * middle[1], FLAT_MIB)}
    return summary


def judge(result: dict) -> dict:
    """Pass/fail of each promise: no failed request, nothing left in the replicas, flat memory."""
    rss = rss_summary(result["samples"], result["load_seconds"])
    after = result["after_load"].values()
    checks = {
        "no_failed_requests": result["requests"]["failed"] == 0 and result["requests"]["sent"] > 0,
        "kv_blocks_back_to_zero": bool(after) and all(a["kv_blocks_in_use"] == 0 for a in after),
        "no_request_left": all(a["running"] == 0 and a["waiting"] == 0 for a in after),
        "rss_flat": bool(rss) and all(r["flat"] for r in rss.values()),
        "clean_shutdown": result["serve_exit_code"] == 0,
    }
    return {"passed": all(checks.values()), "checks": checks, "rss": rss}


def _markdown(result: dict) -> str:
    config, requests, verdict = result["config"], result["requests"], result["verdict"]
    seconds = result["load_seconds"]
    engine = f"quantization {config['quantization']}" if config["engine"] == "real" else "mock engine"
    lines = [f"# Soak: {result['model']}, {config['replicas']} replicas ({engine}), C={config['concurrency']}", "",
             f"Load: {seconds:g} s, {requests['sent']} requests ({requests['sent'] / seconds:.2f}/s), "
             f"{requests['output_tokens']} output tokens ({requests['output_tokens'] / seconds:.1f}/s), "
             f"max_tokens {config['min_tokens']}-{config['max_tokens']}, ignore_eos.", "",
             "| requests | sent | failed |", "| --- | ---: | ---: |"]
    lines += [f"| {kind} | {c['sent']} | {c['failed']} |" for kind, c in sorted(requests["by_kind"].items())]
    lines += [f"| **all** | **{requests['sent']}** | **{requests['failed']}** |", "",
              "| process | RSS start (MiB) | middle | end | max | 2nd-half growth | 2nd-half slope (MiB/min) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in sorted(verdict["rss"].items()):
        lines.append(f"| {name} | {r['start_mib']:.0f} | {r['middle_mib']:.0f} | {r['end_mib']:.0f} | "
                     f"{r['max_mib']:.0f} | {r['second_half_growth_mib']:+.1f} | "
                     f"{r['second_half_slope_mib_per_min']:+.2f} |")
    lines += ["", "| replica after the load | KV blocks in use | of | running | waiting |",
              "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {address} | {a['kv_blocks_in_use']} | {a['kv_blocks_total']} | {a['running']} | {a['waiting']} |"
              for address, a in sorted(result["after_load"].items())]
    lines += ["", "| check | result |", "| --- | --- |"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in verdict["checks"].items()]
    if requests["errors"]:
        lines += ["", "First errors:", ""] + [f"- `{error}`" for error in requests["errors"]]
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, points in sorted(rss_series(result["samples"], result["load_seconds"]).items()):
        ax.plot([t / 60 for t, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("minutes of load")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Soak at C={result['config']['concurrency']}: resident memory per process")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out: str) -> tuple[Path, Path, Path]:
    """Write stress.json, stress.md and stress_rss.png under `out`; returns their paths."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "stress.json", directory / "stress.md", directory / "stress_rss.png"
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(_markdown(result))
    _plot(result, paths[2])
    return paths
