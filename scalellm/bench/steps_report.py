"""Reports of stepped-load runs (``scalellm bench --load-steps``): results.json, results.md, timeline.png.

results.json::

    {"config": {...}, "systems": {name: {...}},
     "steps": [{"system", "step", "concurrency", "start_s", "duration_s", "summary": {bench summary}}],
     "timelines": {name: [{"t", "concurrency", "output_throughput", "completed", "median_e2el_ms", "shape"}]},
     "shapes": {name: [[seconds, "RxP"], ...]}}
"""

from __future__ import annotations

from pathlib import Path

from scalellm.bench.report import write_json

STEP_COLUMNS = (
    ("out tok/s", "output_throughput", "{:.1f}"),
    ("E2E p50 ms", "median_e2el_ms", "{:.0f}"),
    ("E2E p99 ms", "p99_e2el_ms", "{:.0f}"),
    ("TTFT p50 ms", "median_ttft_ms", "{:.0f}"),
    ("TPOT p50 ms", "median_tpot_ms", "{:.1f}"),
    ("completed", "completed", "{:.0f}"),
    ("failed", "failed", "{:.0f}"),
)


def steps_document(config: dict, systems: dict, measured: dict) -> dict:
    """`measured` maps each system to (step rows, timeline rows, sampled shapes)."""
    document = {"config": config, "systems": systems, "steps": [], "timelines": {}, "shapes": {}}
    for name, (rows, timeline, shapes) in measured.items():
        document["steps"] += [{"system": name, **row} for row in rows]
        document["timelines"][name] = timeline
        document["shapes"][name] = shapes
    return document


def steps_table(steps: list[dict], part: str = "summary") -> str:
    """One row per (system, step); `part` "settled" tabulates the settled summaries instead."""
    lines = ["| system | step | C | seconds | " + " | ".join(t for t, _, _ in STEP_COLUMNS) + " |",
             "|" + "---|" * (len(STEP_COLUMNS) + 4)]
    for row in steps:
        summary = row.get(part) or {}
        cells = [fmt.format(summary[key]) if summary.get(key) is not None else "-" for _, key, fmt in STEP_COLUMNS]
        lines.append(f"| {row['system']} | {row['step'] + 1} | {row['concurrency']} | {row['duration_s']:g} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_steps_markdown(document: dict) -> str:
    parts = ["# Stepped-load results", "", f"Workload: {document['config'].get('workload', '')}", "",
             "Per step: the requests sent during it; throughput over its window (its start to the end "
             "of its last request). Latencies in ms.", "", steps_table(document["steps"])]
    settle_s = document["config"].get("settle_s")
    if settle_s:
        parts += ["", f"## Settled: requests sent from {settle_s:g} s after each step's start", "",
                  steps_table(document["steps"], "settled")]
    for name, shapes in document.get("shapes", {}).items():
        if shapes:
            changes = ", ".join(f"{label} at {moment:.0f} s" for moment, label in shapes)
            parts += ["", f"Shapes of {name}: {changes}"]
    return "\n".join(parts) + "\n"


def plot_timeline(document: dict, path: Path) -> None:
    """Scheduled concurrency, output tokens/s and E2E p50 over time, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    for index, (name, rows) in enumerate(document["timelines"].items()):
        times = [row["t"] for row in rows]
        color = f"C{index}"
        if index == 0:
            axes[0].step(times, [row["concurrency"] for row in rows], where="post", color="gray",
                         label="scheduled concurrency")
        axes[1].plot(times, [row["output_throughput"] for row in rows], color=color, label=name)
        axes[2].plot(times, [row["median_e2el_ms"] for row in rows], color=color, label=name)
        for moment, label in document.get("shapes", {}).get(name, [])[1:]:
            for axis in axes:
                axis.axvline(moment, color=color, linestyle=":", alpha=0.7)
            axes[0].annotate(f"{name}: {label}", (moment, 1), rotation=90, fontsize="x-small", color=color,
                             va="bottom")
    axes[0].set_yscale("log", base=2)
    for axis, ylabel in zip(axes, ("requests in flight", "output tokens/s", "E2E p50 (ms)")):
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("seconds since the start (dotted: shape changes)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_steps_report(output_dir: Path, document: dict) -> list[Path]:
    """results.json, results.md and timeline.png under `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "results.json", output_dir / "results.md", output_dir / "timeline.png"]
    write_json(paths[0], document)
    paths[1].write_text(render_steps_markdown(document))
    plot_timeline(document, paths[2])
    return paths
