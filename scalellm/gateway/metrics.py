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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scalellm.protocol.types import EngineLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 1.0, 2.5)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
STAGES = ("admit", "parse", "route", "wait_first_chunk", "stream", "tokenize", "queue", "prefill", "decode")
"""The stages of scalellm:request_stage_seconds, in the order a request passes them."""


class GatewayMetrics:
    """All gateway metrics; label children are cached so the per-request cost stays a few increments."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("scalellm:gateway_requests", "HTTP requests by route and status",
                                 ["route", "status"], registry=registry)
        self.in_flight = Gauge("scalellm:gateway_requests_in_flight", "Inference requests in flight",
                               registry=registry)
        self._dispatched = Counter("scalellm:gateway_replica_dispatched", "Attempts sent to each replica",
                                   ["replica"], registry=registry)
        self._failed = Counter("scalellm:gateway_replica_failures", "Failed attempts per replica",
                               ["replica"], registry=registry)
        self._healthy = Gauge("scalellm:gateway_replica_healthy", "1 when the replica is routable",
                              ["replica"], registry=registry)
        self.ttft = Histogram("scalellm:time_to_first_token_seconds", "Time to first token at the gateway",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("scalellm:request_time_per_output_token_seconds",
                              "Each request's mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("scalellm:e2e_request_latency_seconds", "End-to-end request latency at the gateway",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("scalellm:prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generation_tokens = Counter("scalellm:generation_tokens", "Generated tokens of finished requests",
                                         registry=registry)
        self._guard_actions = Counter("scalellm:gateway_guard_actions", "Guard actions (blocked_input, "
                                      "redacted_input, masked_output, blocked_output, error_open, error_closed) "
                                      "by guard and API key id", ["guard", "key", "action"], registry=registry)
        self._replica_loads = ReplicaLoads()
        registry.register(self._replica_loads)
        self._stages = Histogram("scalellm:request_stage_seconds", "Seconds a finished request spent in each "
                                 "stage (gateway: admit, parse, route, wait_first_chunk, stream; replica: "
                                 "tokenize, queue, prefill, decode)", ["stage"], buckets=_LATENCY_BUCKETS,
                                 registry=registry)
        self._vllm_stages = {name: Histogram(f"scalellm:request_{name}_time_seconds", help_text,
                                             buckets=_LATENCY_BUCKETS, registry=registry)
                             for name, help_text in (
                                 ("queue", "Seconds in the replica's waiting queue"),
                                 ("prefill", "Seconds from first scheduled to the first token"),
                                 ("decode", "Seconds from the first token to the last"),
                                 ("inference", "Seconds from first scheduled to the last token"))}
        self._success = Counter("scalellm:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=registry)
        self._key_requests = Counter("scalellm:api_key_requests", "Inference requests per API key id "
                                     "(a short digest of the key; anonymous without keys)", ["key"],
                                     registry=registry)
        self._key_prompt_tokens = Counter("scalellm:api_key_prompt_tokens", "Prompt tokens per API key id",
                                          ["key"], registry=registry)
        self._key_generation_tokens = Counter("scalellm:api_key_generation_tokens",
                                              "Generated tokens per API key id", ["key"], registry=registry)
        self.spans_dropped = Counter("scalellm:tracing_spans_dropped", "Trace spans the gateway could not "
                                     "export (collector unreachable or too slow)", registry=registry)
        self._shape_info = Gauge("scalellm:shape_info", "1 for the deployment shape serving now "
                                 "(replicas x parallelism per replica), 0 for earlier ones",
                                 ["replicas", "parallel"], registry=registry)
        self.shape_changes = Counter("scalellm:shape_changes", "Changes of the deployment shape",
                                     registry=registry)
        self._shape: tuple[str, str] | None = None
        self._children: dict = {}

    def _child(self, metric, *labels):
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request answered with `status`."""
        self._child(self._requests, route, str(status)).inc()

    def count_guard(self, guard: str, key_id: str, action: str) -> None:
        """One guard action on a request of the key `key_id` (a short digest id, never the key)."""
        self._child(self._guard_actions, guard, key_id, action).inc()

    def replica_dispatched(self, address: str) -> None:
        self._child(self._dispatched, address).inc()

    def replica_failed(self, address: str) -> None:
        self._child(self._failed, address).inc()

    def set_replica_healthy(self, address: str, healthy: bool) -> None:
        self._child(self._healthy, address).set(1 if healthy else 0)
        self._child(self._dispatched, address)  # a replica's counters exist, at 0, from its first probe
        self._child(self._failed, address)

    def forget_replica(self, address: str) -> None:
        """Drop the series of a replica taken out of the deployment (no stale gauges)."""
        self._replica_loads.forget(address)
        for metric in (self._dispatched, self._failed, self._healthy):
            self._children.pop((id(metric), (address,)), None)
            try:
                metric.remove(address)
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
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if num_output_tokens > 1:
                self.tpot.observe((e2e_s - ttft_s) / (num_output_tokens - 1))

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
        for stage, start, end in points:
            if start and end:
                self._child(self._stages, stage).observe(max(end - start, 0.0))
        if replica is not None and replica.scheduled_time and replica.last_token_time:
            vllm = self._vllm_stages
            vllm["queue"].observe(max(replica.scheduled_time - queued, 0.0))
            vllm["prefill"].observe(max(replica.first_token_time - replica.scheduled_time, 0.0))
            vllm["decode"].observe(max(replica.last_token_time - replica.first_token_time, 0.0))
            vllm["inference"].observe(max(replica.last_token_time - replica.scheduled_time, 0.0))
        if record.finish_reason is not None:
            self._child(self._success, record.finish_reason).inc()

    def count_key(self, key_id: str | None, num_prompt_tokens: int, num_output_tokens: int) -> None:
        """One inference request of the key `key_id` (None: refused before the key was known)."""
        if key_id is None:
            return
        self._child(self._key_requests, key_id).inc()
        if num_prompt_tokens:
            self._child(self._key_prompt_tokens, key_id).inc(num_prompt_tokens)
        if num_output_tokens:
            self._child(self._key_generation_tokens, key_id).inc(num_output_tokens)

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
