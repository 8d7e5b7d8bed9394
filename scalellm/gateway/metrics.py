"""Prometheus metrics of one gateway, in their own registry (no process-global state).

Names follow vLLM's in spirit, with the `scalellm:` prefix. Replica-side gauges come from the
polled `Load` of each replica and carry a `replica` label.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from scalellm.protocol.types import EngineLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 1.0, 2.5)

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


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
        self.tpot = Histogram("scalellm:time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("scalellm:e2e_request_latency_seconds", "End-to-end request latency at the gateway",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("scalellm:prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generation_tokens = Counter("scalellm:generation_tokens", "Generated tokens of finished requests",
                                         registry=registry)
        self._replica_gauges = {
            name: Gauge(f"scalellm:{name}", help_text, ["replica"], registry=registry)
            for name, help_text in (
                ("num_requests_running", "Requests in the replica's batch (polled)"),
                ("num_requests_waiting", "Requests waiting in the replica (polled)"),
                ("kv_cache_usage_perc", "Fraction of the replica's KV blocks in use (polled)"),
                ("prefix_cache_queried_tokens", "Cumulative prompt tokens looked up in the prefix cache (polled)"),
                ("prefix_cache_hit_tokens", "Cumulative prompt tokens found in the prefix cache (polled)"),
                ("num_preemptions", "Cumulative preempted requests (polled)"),
            )}
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

    def replica_dispatched(self, address: str) -> None:
        self._child(self._dispatched, address).inc()

    def replica_failed(self, address: str) -> None:
        self._child(self._failed, address).inc()

    def set_replica_healthy(self, address: str, healthy: bool) -> None:
        self._child(self._healthy, address).set(1 if healthy else 0)

    def forget_replica(self, address: str) -> None:
        """Drop the series of a replica taken out of the deployment (no stale gauges)."""
        for metric in (self._dispatched, self._failed, self._healthy, *self._replica_gauges.values()):
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

    def observe_replica_load(self, address: str, load: EngineLoad) -> None:
        """Copy a polled `Load` into the replica-labelled gauges."""
        gauges = self._replica_gauges
        kv_usage = 1.0 - load.num_free_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
        for name, value in (("num_requests_running", load.num_running),
                            ("num_requests_waiting", load.num_waiting),
                            ("kv_cache_usage_perc", kv_usage),
                            ("prefix_cache_queried_tokens", load.prefix_cache_queried_tokens),
                            ("prefix_cache_hit_tokens", load.prefix_cache_hit_tokens),
                            ("num_preemptions", load.num_preemptions)):
            self._child(gauges[name], address).set(value)

    def render(self) -> bytes:
        """The Prometheus text exposition of all metrics."""
        return generate_latest(self.registry)
