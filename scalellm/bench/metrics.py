"""Pure functions from raw request measurements to the summary of one run.

Names and definitions follow ``vllm bench serve`` so numbers compare directly:

* ``request_throughput`` = completed / duration; ``output_throughput`` = output
  tokens / duration; ``total_token_throughput`` = (input + output tokens) / duration.
* TTFT per request: first content chunk. TPOT per request: (e2e - ttft) /
  (output_tokens - 1), for requests with more than one output token.
  ITL: every gap between consecutive content chunks, pooled over requests.
  E2EL: the request's end-to-end latency (see client.py for where it ends).
* Percentiles: linear interpolation between closest ranks (numpy's default).
* Goodput: completed requests meeting every given SLO (ttft, tpot, e2el, in
  seconds), per second of duration (None without SLOs).
* Peaks: ``max_concurrent_requests`` (most requests open at once) and
  ``max_output_tokens_per_s`` (content chunks, one per token as vLLM counts
  them, in the busiest whole second since the first send).
* ITL during prefill: the ITL gaps of a stream that overlap another request's
  wait for its first token (from its send to its first content chunk: queueing
  and prefill), pooled (``*_itl_during_prefill_ms``), and the other gaps
  (``*_itl_outside_prefill_ms``). With long prompts this shows how much a prefill
  stalls the streams already decoding.
* Isolation: ``other_cpu_seconds`` is the machine's busy CPU in the window less
  the server's and the bench's; ``other_cpu_share`` divides it by the duration
  (0.5 = half a core busy elsewhere on average); ``steal_cpu_seconds`` is what the
  hypervisor took. A fair run has both near zero.
"""

from __future__ import annotations

import bisect
import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

from scalellm.bench.client import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)
MAX_ERRORS_KEPT = 5
SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class RunWindow:
    """What a run measured besides the requests: its duration and CPU use."""

    duration_s: float
    server_cpu_s: float | None = None
    bench_cpu_s: float = 0.0
    concurrency: int = 1
    request_rate: float = math.inf
    other_cpu_s: float | None = None
    """CPU the machine spent on anything but the server and the bench (None when unknown)."""
    steal_s: float | None = None
    """CPU time the hypervisor took from this machine during the window."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; 0.0 for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def request_tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, or None with fewer than two tokens."""
    if result.output_tokens <= 1:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def parse_slos(text: str | None) -> dict[str, float]:
    """``"ttft=0.5,tpot=0.05"`` (seconds) -> {"ttft": 0.5, "tpot": 0.05}."""
    slos: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in SLO_NAMES:
            raise ValueError(f"--slo items look like ttft=0.5 with a name in {SLO_NAMES}, got {item!r}")
        try:
            slos[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--slo {name}: {value!r} is not a number of seconds") from None
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO given."""
    observed = {"ttft": result.ttft, "tpot": request_tpot(result) or 0.0, "e2el": result.latency}
    return all(observed[name] <= limit for name, limit in slos.items())


def latency_samples(results: Iterable[RequestResult]) -> dict[str, list[float]]:
    """Per-metric samples in seconds over the successful requests."""
    samples: dict[str, list[float]] = {name: [] for name in LATENCY_METRICS}
    for result in results:
        if not result.success:
            continue
        samples["ttft"].append(result.ttft)
        samples["e2el"].append(result.latency)
        samples["itl"].extend(result.itl)
        tpot = request_tpot(result)
        if tpot is not None:
            samples["tpot"].append(tpot)
    return samples


def summarize(results: Sequence[RequestResult], window: RunWindow,
              slos: dict[str, float] | None = None) -> dict:
    """The summary of one run, keyed as vllm bench serve's result file (times in ms)."""
    if window.duration_s <= 0:
        raise ValueError("a run's duration must be positive")
    done = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary = {
        "duration": window.duration_s,
        "max_concurrency": window.concurrency,
        "request_rate": window.request_rate if math.isfinite(window.request_rate) else "inf",
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": [r.error for r in results if not r.success][:MAX_ERRORS_KEPT],
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / window.duration_s,
        "output_throughput": output_tokens / window.duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / window.duration_s,
    }
    summary["request_goodput"] = None
    if slos:
        good = sum(1 for r in done if meets_slos(r, slos))
        summary["request_goodput"] = good / window.duration_s
        summary["slos"] = dict(slos)
    summary["max_concurrent_requests"] = max_concurrent_requests(results)
    summary["max_output_tokens_per_s"] = max_output_tokens_per_s(done)
    for name, values in latency_samples(results).items():
        summary.update(_latency_stats(name, values))
    during, outside = split_itl_by_prefill(done)
    for name, values in (("itl_during_prefill", during), ("itl_outside_prefill", outside)):
        stats = _latency_stats(name, values)
        summary.update(stats if values else dict.fromkeys(stats))  # None, not 0, when nothing overlapped
    summary["num_itl_during_prefill"] = len(during)
    summary.update(_cpu_stats(window, len(done)))
    return summary


def split_itl_by_prefill(results: Sequence[RequestResult]) -> tuple[list[float], list[float]]:
    """ITL gaps (seconds) that overlap another request's send-to-first-token window, and the rest.

    A request's own window ends at its first token, before any of its gaps, so only
    other requests' windows can overlap a gap: windows sorted by start, a gap (a, b)
    overlaps one iff some window starting before b ends after a (a prefix maximum).
    """
    windows = sorted((r.start_wall, r.start_wall + r.ttft) for r in results if r.success and r.itl)
    starts = [start for start, _ in windows]
    latest_end, running = [], -math.inf
    for _, end in windows:
        running = max(running, end)
        latest_end.append(running)
    during, outside = [], []
    for result in results:
        moment = result.start_wall + result.ttft
        for gap in result.itl:
            begin, moment = moment, moment + gap
            index = bisect.bisect_left(starts, moment)
            (during if index and latest_end[index - 1] > begin else outside).append(gap)
    return during, outside


def max_concurrent_requests(results: Iterable[RequestResult]) -> int:
    """The most requests open at the same time (send to end of response)."""
    events = []
    for result in results:
        events.append((result.start_wall, 1))
        events.append((result.start_wall + max(result.stream_end, result.latency), -1))
    open_now = peak = 0
    for _, change in sorted(events):  # at equal times an end (-1) sorts before a start
        open_now += change
        peak = max(peak, open_now)
    return peak


def max_output_tokens_per_s(results: Sequence[RequestResult]) -> int:
    """Content chunks received in the busiest whole second after the first send."""
    if not results:
        return 0
    origin = min(r.start_wall for r in results)
    buckets: dict[int, int] = {}
    for result in results:
        moment = result.start_wall + result.ttft
        for gap in [0.0, *result.itl]:
            moment += gap
            second = int(moment - origin)
            buckets[second] = buckets.get(second, 0) + 1
    return max(buckets.values())


def _latency_stats(name: str, values_s: list[float]) -> dict[str, float]:
    values = [v * 1000.0 for v in values_s]
    stats = {
        f"mean_{name}_ms": statistics.fmean(values) if values else 0.0,
        f"median_{name}_ms": percentile(values, 50),
        f"std_{name}_ms": statistics.pstdev(values) if values else 0.0,
    }
    for q in PERCENTILES:
        stats[f"p{q}_{name}_ms"] = percentile(values, q)
    return stats


def _cpu_stats(window: RunWindow, completed: int) -> dict[str, float | None]:
    per = max(completed, 1)
    server = window.server_cpu_s
    return {
        "server_cpu_seconds": server,
        "server_cpu_ms_per_request": None if server is None else server * 1000.0 / per,
        "bench_cpu_seconds": window.bench_cpu_s,
        "bench_cpu_ms_per_request": window.bench_cpu_s * 1000.0 / per,
        "other_cpu_seconds": window.other_cpu_s,
        "other_cpu_share": None if window.other_cpu_s is None else window.other_cpu_s / window.duration_s,
        "steal_cpu_seconds": window.steal_s,
    }


def aggregate_repeats(summaries: Sequence[dict]) -> dict[str, dict[str, float]]:
    """For each numeric key: median, min and max over the repeats of one point."""
    if not summaries:
        return {}
    keys = [k for k, v in summaries[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    aggregate = {}
    for key in keys:
        values = [s[key] for s in summaries if isinstance(s.get(key), (int, float))]
        if values:
            aggregate[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return aggregate
