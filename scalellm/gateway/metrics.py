"""Prometheus metrics of one gateway, in their own registry (no process-global state).

Where vLLM has a metric of the same meaning, it has vLLM's name with the `scalellm:` prefix instead of
`vllm:` (time_to_first_token_seconds, request_time_per_output_token_seconds,
e2e_request_latency_seconds, request_queue_time_seconds,
request_prefill_time_seconds, request_decode_time_seconds, request_inference_time_seconds,
request_success, prompt_tokens, generation_tokens, num_requests_running, num_requests_waiting,
kv_cache_usage_perc, prefix_cache_queries, prefix_cache_hits, num_preemptions), so dashboards made
for vLLM port by changing the prefix. Replica-side series come from the polled `Load` of each
replica and carry a `replica` label; per-key series carry the key's short digest id, never the key.
The stages of `scalellm:request_stage_seconds` are the spans' (gateway/tracing.py, tracing/replica.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from scalellm.protocol.types import EngineLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 1.0, 2.5)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
STAGES = ("admit", "parse", "route", "wait_first_chunk", "stream", "tokenize", "queue", "prefill", "decode")
"""The stages of scalellm:request_stage_seconds, in the order a request passes them."""


class GatewayMetrics:
    """All gateway metrics. The series a request updates (some two dozen per request) are `LoopSeries`,
    kept without prometheus_client's per-update lock: every update and every scrape runs on the event
    loop's thread. The rest, updated rarely or off the loop, are prometheus_client's own metrics."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        series = LoopSeries()
        registry.register(series)
        self._requests = series.counter("scalellm:gateway_requests", "HTTP requests by route and status",
                                        ("route", "status"))
        self._in_flight = Gauge("scalellm:gateway_requests_in_flight", "Inference requests in flight",
                                registry=registry)
        self._dispatched = series.counter("scalellm:gateway_replica_dispatched", "Attempts sent to each replica",
                                          ("replica",))
        self._failed = series.counter("scalellm:gateway_replica_failures", "Failed attempts per replica",
                                      ("replica",))
        self._healthy = Gauge("scalellm:gateway_replica_healthy", "1 when the replica is routable",
                              ["replica"], registry=registry)
        self._ttft = series.histogram("scalellm:time_to_first_token_seconds", "Time to first token at the gateway",
                                      _LATENCY_BUCKETS).child()
        self._tpot = series.histogram("scalellm:request_time_per_output_token_seconds",
                                      "Each request's mean time per output token after the first",
                                      _TPOT_BUCKETS).child()
        self._e2e = series.histogram("scalellm:e2e_request_latency_seconds",
                                     "End-to-end request latency at the gateway", _LATENCY_BUCKETS).child()
        self._prompt_tokens = series.counter("scalellm:prompt_tokens", "Prompt tokens of finished requests").child()
        self._generation_tokens = series.counter("scalellm:generation_tokens",
                                                 "Generated tokens of finished requests").child()
        self._guard_actions = series.counter("scalellm:gateway_guard_actions", "Guard actions (blocked_input, "
                                             "redacted_input, masked_output, blocked_output, error_open, "
                                             "error_closed) by guard and API key id", ("guard", "key", "action"))
        self._replica_loads = ReplicaLoads()
        registry.register(self._replica_loads)
        self._stages = series.histogram("scalellm:request_stage_seconds", "Seconds a finished request spent in "
                                        "each stage (gateway: admit, parse, route, wait_first_chunk, stream; "
                                        "replica: tokenize, queue, prefill, decode)", _LATENCY_BUCKETS, ("stage",))
        self._vllm_stages = {name: series.histogram(f"scalellm:request_{name}_time_seconds", help_text,
                                                    _LATENCY_BUCKETS).child()
                             for name, help_text in (
                                 ("queue", "Seconds in the replica's waiting queue"),
                                 ("prefill", "Seconds from first scheduled to the first token"),
                                 ("decode", "Seconds from the first token to the last"),
                                 ("inference", "Seconds from first scheduled to the last token"))}
        self._success = series.counter("scalellm:request_success", "Finished requests by finish reason",
                                       ("finished_reason",))
        self._key_requests = series.counter("scalellm:api_key_requests", "Inference requests per API key id "
                                            "(a short digest of the key; anonymous without keys)", ("key",))
        self._key_prompt_tokens = series.counter("scalellm:api_key_prompt_tokens", "Prompt tokens per API key id",
                                                 ("key",))
        self._key_generation_tokens = series.counter("scalellm:api_key_generation_tokens",
                                                     "Generated tokens per API key id", ("key",))
        # Incremented by the span exporter's thread: a locked prometheus_client counter.
        self.spans_dropped = Counter("scalellm:tracing_spans_dropped", "Trace spans the gateway could not "
                                     "export (collector unreachable or too slow)", registry=registry)
        self._shape_info = Gauge("scalellm:shape_info", "1 for the deployment shape serving now "
                                 "(replicas x parallelism per replica), 0 for earlier ones",
                                 ["replicas", "parallel"], registry=registry)
        self.shape_changes = Counter("scalellm:shape_changes", "Changes of the deployment shape",
                                     registry=registry)
        self._shape: tuple[str, str] | None = None

    def track_in_flight(self, count: Callable[[], int]) -> None:
        """Read the inference requests in flight from `count` at each scrape."""
        self._in_flight.set_function(count)

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request answered with `status`."""
        self._requests.child(route, str(status)).inc()

    def count_guard(self, guard: str, key_id: str, action: str) -> None:
        """One guard action on a request of the key `key_id` (a short digest id, never the key)."""
        self._guard_actions.child(guard, key_id, action).inc()

    def replica_dispatched(self, address: str) -> None:
        self._dispatched.child(address).inc()

    def replica_failed(self, address: str) -> None:
        self._failed.child(address).inc()

    def set_replica_healthy(self, address: str, healthy: bool) -> None:
        self._healthy.labels(address).set(1 if healthy else 0)  # on failures and probes, not per request
        self._dispatched.child(address)  # a replica's counters exist, at 0, from its first probe
        self._failed.child(address)

    def forget_replica(self, address: str) -> None:
        """Drop the series of a replica taken out of the deployment (no stale gauges)."""
        self._replica_loads.forget(address)
        self._dispatched.remove(address)
        self._failed.remove(address)
        try:
            self._healthy.remove(address)
        except KeyError:
            pass

    def set_shape(self, replicas: int, parallel: int) -> bool:
        """Record the shape serving now; returns True (and counts a change) when it differs from the last one."""
        labels = (str(replicas), str(parallel))
        if labels == self._shape:
            return False
        changed = self._shape is not None
        if changed:
            self._shape_info.labels(*self._shape).set(0)
            self.shape_changes.inc()
        self._shape_info.labels(*labels).set(1)
        self._shape = labels
        return changed

    def observe_finished(self, ttft_s: float | None, e2e_s: float, num_prompt_tokens: int,
                         num_output_tokens: int) -> None:
        """Latency and token counts of one completed inference request."""
        self._e2e.observe(e2e_s)
        self._prompt_tokens.inc(num_prompt_tokens)
        self._generation_tokens.inc(num_output_tokens)
        if ttft_s is not None:
            self._ttft.observe(ttft_s)
            if num_output_tokens > 1:
                self._tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))

    def observe_stages(self, record, end_s: float) -> None:
        """The stage durations of a request that succeeded (a RequestRecord, gateway/serving.py)."""
        replica = record.replica_metrics
        points = [("admit", record.receive_time, record.admitted_time),
                  ("parse", record.admitted_time, record.parsed_time),
                  ("route", record.parsed_time, record.routed_time),
                  ("wait_first_chunk", record.routed_time, record.first_output_time),
                  ("stream", record.first_output_time, end_s)]
        if replica is not None:
            queued = replica.queued_time or replica.scheduled_time
            points += [("tokenize", replica.replica_receive_time, queued),
                       ("queue", queued, replica.scheduled_time),
                       ("prefill", replica.scheduled_time, replica.first_token_time),
                       ("decode", replica.first_token_time, replica.last_token_time)]
        stages = self._stages
        for stage, start, end in points:
            if start and end:
                stages.child(stage).observe(max(end - start, 0.0))
        if replica is not None and replica.scheduled_time and replica.last_token_time:
            vllm = self._vllm_stages
            vllm["queue"].observe(max(replica.scheduled_time - queued, 0.0))
            vllm["prefill"].observe(max(replica.first_token_time - replica.scheduled_time, 0.0))
            vllm["decode"].observe(max(replica.last_token_time - replica.first_token_time, 0.0))
            vllm["inference"].observe(max(replica.last_token_time - replica.scheduled_time, 0.0))
        if record.finish_reason is not None:
            self._success.child(record.finish_reason).inc()

    def count_key(self, key_id: str | None, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """One inference request of the key `key_id` (None: refused before the key was known)."""
        if key_id is None:
            return
        self._key_requests.child(key_id).inc()
        if num_prompt_tokens:
            self._key_prompt_tokens.child(key_id).inc(num_prompt_tokens)
        if num_output_tokens:
            self._key_generation_tokens.child(key_id).inc(num_output_tokens)

    def observe_replica_load(self, address: str, load: EngineLoad) -> None:
        """Keep a polled `Load` for the replica-labelled series."""
        self._replica_loads.observe(address, load)

    def render(self) -> bytes:
        """The Prometheus text exposition of all metrics."""
        return generate_latest(self.registry)


class ReplicaLoads(Collector):
    """The replica-labelled series of the last `Load` polled from each replica: gauges of what is now,
    counters of what the replica counts since it started (a restarted replica starts again at 0,
    which Prometheus's rate() reads as a counter reset)."""

    _GAUGES = (("num_requests_running", "Requests in the replica's batch (polled)"),
               ("num_requests_waiting", "Requests waiting in the replica's queue (polled)"),
               ("kv_cache_usage_perc", "Fraction of the replica's KV blocks in use, 0 to 1 (polled)"))
    _COUNTERS = (("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (polled)"),
                 ("prefix_cache_hits", "Prompt tokens found in the prefix cache (polled)"),
                 ("num_preemptions", "Requests preempted (polled)"),
                 ("replica_tracing_spans_dropped", "Trace spans the replica could not export (polled)"))

    def __init__(self) -> None:
        self._loads: dict[str, EngineLoad] = {}

    def observe(self, address: str, load: EngineLoad) -> None:
        self._loads[address] = load

    def forget(self, address: str) -> None:
        self._loads.pop(address, None)

    def describe(self):
        return [GaugeMetricFamily(f"scalellm:{name}", text, labels=["replica"]) for name, text in self._GAUGES] + \
            [CounterMetricFamily(f"scalellm:{name}", text, labels=["replica"]) for name, text in self._COUNTERS]

    def collect(self):
        families = {name: GaugeMetricFamily(f"scalellm:{name}", text, labels=["replica"])
                    for name, text in self._GAUGES}
        families.update({name: CounterMetricFamily(f"scalellm:{name}", text, labels=["replica"])
                         for name, text in self._COUNTERS})
        for address, load in list(self._loads.items()):
            kv_usage = 1.0 - load.num_free_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
            for name, value in (("num_requests_running", load.num_running),
                                ("num_requests_waiting", load.num_waiting), ("kv_cache_usage_perc", kv_usage),
                                ("prefix_cache_queries", load.prefix_cache_queried_tokens),
                                ("prefix_cache_hits", load.prefix_cache_hit_tokens),
                                ("num_preemptions", load.num_preemptions),
                                ("replica_tracing_spans_dropped", load.num_spans_dropped)):
                families[name].add_metric([address], value)
        return list(families.values())


class LoopSeries(Collector):
    """Counter and histogram families updated and scraped only on the event loop's thread.

    prometheus_client takes a lock per update (a histogram observation takes two, and walks its
    buckets in Python); here an update is an addition, a histogram's a bisect and two. The families
    are exposed as prometheus_client's would be, `_created` series included.
    """

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def counter(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> _Family:
        return self._add(_Family(name, documentation, labelnames, None))

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...],
                  labelnames: tuple[str, ...] = ()) -> _Family:
        return self._add(_Family(name, documentation, labelnames, tuple(buckets)))

    def _add(self, family: _Family) -> _Family:
        self._families.append(family)
        if not family.labelnames:
            family.child()  # an unlabelled series exists, at 0, from the start
        return family

    def collect(self):
        return [family.collect() for family in self._families]


class _CounterValue:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bucket holds the values <= its bound
        self.sum += value


class _Family:
    """One metric's series by label values: counters when `bounds` is None, else histograms."""

    __slots__ = ("name", "documentation", "labelnames", "bounds", "_children")

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 bounds: tuple[float, ...] | None) -> None:
        self.name, self.documentation, self.labelnames, self.bounds = name, documentation, labelnames, bounds
        self._children: dict[tuple[str, ...], _CounterValue | _HistogramValue] = {}

    def child(self, *labels: str):
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = _CounterValue() if self.bounds is None else _HistogramValue(self.bounds)
        return child

    def remove(self, *labels: str) -> None:
        self._children.pop(labels, None)

    def collect(self):
        if self.bounds is None:
            family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for labels, child in self._children.items():
                family.add_metric(labels, child.value, created=child.created)
            return family
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(bound) for bound in self.bounds] + ["+Inf"]
        created = []
        for labels, child in self._children.items():
            cumulative, buckets = 0, []
            for le, count in zip(les, child.counts):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(labels, buckets, child.sum)
            created.append(Sample(f"{self.name}_created", dict(zip(self.labelnames, labels)), child.created))
        family.samples += created
        return family
