"""PNG plots of a benchmark (matplotlib, Agg backend, no display needed).

* throughput.png: output tokens/s and requests/s vs concurrency, one line per
  system, error bars spanning min–max over repeats.
* latency.png: TTFT and E2E latency (p50 solid, p99 dashed) vs concurrency.
* ttft_cdf.png: the distribution (CDF) of TTFT per system, one panel per concurrency.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _series(document: dict, system: str, key: str) -> tuple[list[int], list[float], list[list[float]]]:
    """Concurrencies, medians and [lower, upper] error lengths of one metric for one system."""
    xs, medians, lower, upper = [], [], [], []
    for row in document["aggregates"]:
        stats = row["metrics"].get(key)
        if row["system"] == system and stats:
            xs.append(row["concurrency"])
            medians.append(stats["median"])
            lower.append(stats["median"] - stats["min"])
            upper.append(stats["max"] - stats["median"])
    return xs, medians, [lower, upper]


def _systems(document: dict) -> list[str]:
    return list(dict.fromkeys(row["system"] for row in document["aggregates"]))


def _concurrencies(document: dict) -> list[int]:
    return sorted({row["concurrency"] for row in document["aggregates"]})


def _concurrency_axis(axis, title: str, ylabel: str, concurrencies: list[int]) -> None:
    axis.set_xscale("log", base=2)
    axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
    axis.minorticks_off()
    axis.set_xlabel("concurrency (requests in flight)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    _legend(axis)


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")


def plot_throughput(document: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for system in _systems(document):
        for axis, key in zip(axes, ("output_throughput", "request_throughput")):
            xs, ys, errors = _series(document, system, key)
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=system)
    concurrencies = _concurrencies(document)
    _concurrency_axis(axes[0], "Output throughput", "output tokens/s", concurrencies)
    _concurrency_axis(axes[1], "Request throughput", "requests/s", concurrencies)
    for axis in axes:
        axis.set_ylim(bottom=0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_latency(document: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, system in enumerate(_systems(document)):
        color = f"C{index}"
        for axis, metric in zip(axes, ("ttft", "e2el")):
            for pct, style in (("median", "-"), ("p99", "--")):
                xs, ys, _ = _series(document, system, f"{pct}_{metric}_ms")
                axis.plot(xs, ys, style, marker="o", color=color, label=f"{system} {pct}")
    concurrencies = _concurrencies(document)
    _concurrency_axis(axes[0], "Time to first token", "ms", concurrencies)
    _concurrency_axis(axes[1], "End-to-end latency", "ms", concurrencies)
    for axis in axes:
        axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_ttft_cdf(document: dict, path: Path) -> None:
    concurrencies = _concurrencies(document)
    figure, axes = plt.subplots(1, len(concurrencies), figsize=(4.2 * len(concurrencies), 3.8), squeeze=False)
    for axis, concurrency in zip(axes[0], concurrencies):
        for system in _systems(document):
            ttfts = sorted(r["ttft"] * 1000.0 for run in document["runs"]
                           if run["system"] == system and run["concurrency"] == concurrency
                           for r in run["requests"] if r["success"])
            if ttfts:
                fractions = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
                axis.step(ttfts, fractions, where="post", label=system)
        axis.set_title(f"TTFT distribution, C={concurrency}")
        axis.set_xlabel("TTFT (ms)")
        axis.set_ylabel("fraction of requests")
        axis.grid(True, alpha=0.3)
        _legend(axis)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(output_dir: Path, document: dict) -> list[Path]:
    """Draw every plot into ``output_dir``; return their paths (none when nothing was measured)."""
    if not document["aggregates"]:
        return []
    paths = [output_dir / "throughput.png", output_dir / "latency.png", output_dir / "ttft_cdf.png"]
    plot_throughput(document, paths[0])
    plot_latency(document, paths[1])
    plot_ttft_cdf(document, paths[2])
    return paths
