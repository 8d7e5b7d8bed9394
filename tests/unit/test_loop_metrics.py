"""The gateway's lock-free series (gateway/metrics.py LoopSeries) expose what prometheus_client's own
Counter and Histogram would for the same updates, and the gateway's metrics read as they should."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from scalellm.gateway.metrics import GatewayMetrics, LoopSeries

BUCKETS = (0.005, 0.01, 0.1, 1.0, 10.0)
VALUES = (0.0, 0.005, 0.0051, 0.1, 0.7, 1.0, 9.99, 10.0, 10.01, 1e6)


def _samples(text: bytes) -> dict:
    """{(sample name, sorted labels): value} without the _created series (times of creation)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text.decode())
            for sample in family.samples if not sample.name.endswith("_created")}


def _families(text: bytes) -> dict:
    return {family.name: (family.type, family.documentation) for family in text_string_to_metric_families(text.decode())}


def test_loop_series_expose_what_prometheus_client_would():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    series = LoopSeries()
    ours.register(series)
    counter = series.counter("t:requests", "requests by route", ("route",))
    plain = series.counter("t:tokens", "tokens")
    histogram = series.histogram("t:latency_seconds", "latency by stage", BUCKETS, ("stage",))
    one = series.histogram("t:ttft_seconds", "ttft", BUCKETS)
    ref_counter = Counter("t:requests", "requests by route", ["route"], registry=theirs)
    ref_plain = Counter("t:tokens", "tokens", registry=theirs)
    ref_histogram = Histogram("t:latency_seconds", "latency by stage", ["stage"], buckets=BUCKETS, registry=theirs)
    ref_one = Histogram("t:ttft_seconds", "ttft", buckets=BUCKETS, registry=theirs)
    for i, value in enumerate(VALUES):
        route, stage = ("/a", "/b")[i % 2], ("parse", "route", "stream")[i % 3]
        counter.child(route).inc()
        ref_counter.labels(route).inc()
        plain.child().inc(i)
        ref_plain.inc(i)
        histogram.child(stage).observe(value)
        ref_histogram.labels(stage).observe(value)
        one.child().observe(value)
        ref_one.observe(value)
    assert _samples(generate_latest(ours)) == _samples(generate_latest(theirs))
    assert _families(generate_latest(ours)) == _families(generate_latest(theirs))
    created = [s for f in text_string_to_metric_families(generate_latest(ours).decode()) for s in f.samples
               if s.name.endswith("_created")]
    assert len(created) == 2 + 1 + 3 + 1  # one per series, as prometheus_client has


def test_unlabelled_series_exist_at_zero_and_removed_children_go():
    registry, series = CollectorRegistry(), LoopSeries()
    registry.register(series)
    series.counter("t:zero", "never counted")
    replicas = series.counter("t:dispatched", "per replica", ("replica",))
    replicas.child("r1").inc()
    replicas.child("r2")
    replicas.remove("r1")
    replicas.remove("r3")  # never there: no error
    samples = _samples(generate_latest(registry))
    assert samples[("t:zero_total", ())] == 0
    assert samples[("t:dispatched_total", (("replica", "r2"),))] == 0
    assert ("t:dispatched_total", (("replica", "r1"),)) not in samples


def test_gateway_metrics_in_flight_and_request_counts():
    metrics = GatewayMetrics()
    in_flight = [0]
    metrics.track_in_flight(lambda: in_flight[0])
    in_flight[0] = 5
    metrics.count_request("/v1/chat/completions", 200)
    metrics.count_request("/v1/chat/completions", 200)
    metrics.count_request("/v1/chat/completions", 400)
    metrics.observe_finished(0.2, 1.2, 10, 11)
    metrics.set_replica_healthy("10.0.0.1:1", True)
    samples = _samples(metrics.render())
    assert samples[("scalellm:gateway_requests_in_flight", ())] == 5
    route = ("route", "/v1/chat/completions")
    assert samples[("scalellm:gateway_requests_total", (route, ("status", "200")))] == 2
    assert samples[("scalellm:gateway_requests_total", (route, ("status", "400")))] == 1
    assert samples[("scalellm:request_time_per_output_token_seconds_sum", ())] == 0.1
    assert samples[("scalellm:time_to_first_token_seconds_bucket", (("le", "0.25"),))] == 1
    assert samples[("scalellm:time_to_first_token_seconds_bucket", (("le", "0.1"),))] == 0
    assert samples[("scalellm:gateway_replica_dispatched_total", (("replica", "10.0.0.1:1"),))] == 0
    metrics.forget_replica("10.0.0.1:1")
    assert not any("10.0.0.1:1" in str(key) for key in _samples(metrics.render()))
