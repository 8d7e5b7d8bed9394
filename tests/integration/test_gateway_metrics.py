"""The gateway's /metrics under vLLM's names: per-stage histograms, finish reasons, the replicas' polled
engine state, and per-key counters that name a key by its digest id, never by the key."""

from __future__ import annotations

import json
import re
import urllib.request

from gateway_fakes import MockCluster

from scalellm.gateway.metrics import STAGES

KEYS = ("sk-alice-secret-1", "sk-bob-secret-2")
METRICS_KEY = "sk-metrics-secret-3"


def call(base_url: str, path: str, key: str, body: dict | None = None) -> bytes:
    request = urllib.request.Request(base_url + path, json.dumps(body).encode() if body else None,
                                     {"content-type": "application/json", "authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def sample(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return float(found.group(1))


def test_stage_histograms_replica_state_and_per_key_counters():
    cluster = MockCluster(api_keys=(*KEYS, f"{METRICS_KEY} metrics"))
    try:
        body = {"model": "mock-model", "prompt": "one two three", "max_tokens": 4}
        for key in (KEYS[0], KEYS[0], KEYS[1]):
            call(cluster.base_url, "/v1/completions", key, body)
        cluster.run(cluster.app.monitor.probe_all())  # poll the replicas' Load now
        text = call(cluster.base_url, "/metrics", METRICS_KEY).decode()
        alice, bob = (cluster.app.service.auth.identify(b"Bearer " + key.encode()) for key in KEYS)
    finally:
        cluster.close()
    for key in (*KEYS, METRICS_KEY):
        assert key not in text
    assert alice and bob and alice != bob
    assert sample(text, "scalellm:api_key_requests_total", f'{{key="{alice}"}}') == 2
    assert sample(text, "scalellm:api_key_requests_total", f'{{key="{bob}"}}') == 1
    assert sample(text, "scalellm:api_key_generation_tokens_total", f'{{key="{alice}"}}') == 8
    assert sample(text, "scalellm:api_key_prompt_tokens_total", f'{{key="{bob}"}}') == 3
    for stage in STAGES:
        assert sample(text, "scalellm:request_stage_seconds_count", f'{{stage="{stage}"}}') == 3, stage
    for name in ("queue", "prefill", "decode", "inference"):
        assert sample(text, f"scalellm:request_{name}_time_seconds_count") == 3
    assert sample(text, "scalellm:request_success_total", '{finished_reason="length"}') == 3
    replica = cluster.servers[0].address
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"):
        assert sample(text, f"scalellm:{name}", f'{{replica="{replica}"}}') >= 0
    assert "# TYPE scalellm:prefix_cache_queries_total counter" in text
    assert sample(text, "scalellm:gateway_replica_failures_total", f'{{replica="{replica}"}}') == 0
