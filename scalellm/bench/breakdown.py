"""End-to-end latency breakdown from per-request stage timestamps.

Contract for servers (ScaleLLM's gateway emits it; any server may):

* Where: non-streamed responses carry the response header
  ``x-scalellm-timings`` with a JSON object, or a top-level field
  ``"scalellm_timings"`` in the response body. Streamed responses carry the
  field ``"scalellm_timings"`` in the final chunk that holds ``usage`` (the
  header may also be sent, but a streamed header cannot know the last token).
  When both are present the body field wins.
* What: a JSON object of wall-clock timestamps, in seconds since the Unix
  epoch as floats (``time.time()``), each optional (absent, null or 0 = not reported)::

      {"gateway_receive": ..,  # gateway has read the whole HTTP request
       "routed": ..,           # gateway chose a replica and sent the gRPC call
       "replica_receive": ..,  # replica received the call
       "queued": ..,           # (optional) tokenized and put in the engine's waiting queue
       "scheduled": ..,        # the engine first scheduled the request
       "first_token": ..,      # first output token sampled
       "last_token": ..,       # last output token sampled
       "gateway_send": ..}     # gateway wrote the last byte of the response

* Stages, each computed for a request only when both ends are present::

      client -> gateway   gateway_receive - client send
      gateway in          routed - gateway_receive          (parse, auth, limits, routing)
      transport           replica_receive - routed          (gRPC hop)
      tokenize            queued - replica_receive          (chat template + tokenizer)
      queue               scheduled - queued
      pre-schedule        scheduled - replica_receive       (tokenize + queue, when no 'queued')
      prefill             first_token - scheduled
      decode              last_token - first_token
      gateway out         gateway_send - last_token
      to client           client end - gateway_send
      after last token    client end - last_token           (gateway out + to client)

  Client times come from the benchmark's own clock; on one machine they share
  the servers' clock, across machines the client stages include clock skew.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from scalellm.bench.client import RequestResult
from scalellm.bench.metrics import percentile

TIMESTAMP_KEYS = ("gateway_receive", "routed", "replica_receive", "queued", "scheduled",
                  "first_token", "last_token", "gateway_send")

# (stage name, start key, end key); "client_send" / "client_end" come from the benchmark.
STAGES = (
    ("client -> gateway", "client_send", "gateway_receive"),
    ("gateway in", "gateway_receive", "routed"),
    ("transport", "routed", "replica_receive"),
    ("tokenize", "replica_receive", "queued"),
    ("queue", "queued", "scheduled"),
    ("pre-schedule", "replica_receive", "scheduled"),
    ("prefill", "scheduled", "first_token"),
    ("decode", "first_token", "last_token"),
    ("gateway out", "last_token", "gateway_send"),
    ("to client", "gateway_send", "client_end"),
    ("after last token", "last_token", "client_end"),
)


def request_points(result: RequestResult) -> dict[str, float]:
    """The request's timestamps, the server's plus the client's send and end."""
    points = {"client_send": result.start_wall, "client_end": result.end_wall}
    for key in TIMESTAMP_KEYS:
        value = (result.timings or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            points[key] = float(value)  # 0 or absent: the stage was not reached or not reported
    return points


def stage_durations(results: Iterable[RequestResult]) -> dict[str, list[float]]:
    """Stage name -> durations in seconds, over successful requests that report timings."""
    durations: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for result in results:
        if not result.success or not result.timings:
            continue
        points = request_points(result)
        for name, start, end in STAGES:
            if name == "pre-schedule" and "queued" in points:
                continue  # tokenize and queue are reported on their own
            if start in points and end in points:
                durations[name].append(points[end] - points[start])
    return durations


def breakdown_table(results: Sequence[RequestResult]) -> list[dict]:
    """Rows of {stage, count, mean_ms, median_ms, p90_ms} for stages seen at least once."""
    rows = []
    for name, values in stage_durations(results).items():
        if values:
            millis = [v * 1000.0 for v in values]
            rows.append({"stage": name, "count": len(millis), "mean_ms": statistics.fmean(millis),
                         "median_ms": percentile(millis, 50), "p90_ms": percentile(millis, 90)})
    return rows


def breakdown_markdown(rows: Sequence[dict]) -> str:
    """The breakdown rows as a Markdown table ('' when no server reported timings)."""
    if not rows:
        return ""
    lines = ["| stage | requests | mean ms | median ms | p90 ms |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['count']} | {row['mean_ms']:.2f} | "
                     f"{row['median_ms']:.2f} | {row['p90_ms']:.2f} |")
    return "\n".join(lines)
