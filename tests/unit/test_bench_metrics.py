"""Metric definitions of the benchmark (same as vllm bench serve)."""

import math

import numpy as np
import pytest

from scalellm.bench.client import RequestResult
from scalellm.bench.metrics import (RunWindow, aggregate_repeats, latency_samples, max_concurrent_requests,
                                    max_output_tokens_per_s, meets_slos, parse_slos, percentile, request_tpot,
                                    summarize)


def ok(ttft, latency, output_tokens, itl=(), prompt_tokens=10):
    return RequestResult(success=True, ttft=ttft, latency=latency, output_tokens=output_tokens,
                         itl=list(itl), prompt_tokens=prompt_tokens)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edge_cases():
    assert percentile([], 50) == 0.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_excludes_the_first_token():
    assert request_tpot(ok(ttft=0.1, latency=0.5, output_tokens=5)) == pytest.approx(0.1)
    assert request_tpot(ok(ttft=0.1, latency=0.1, output_tokens=1)) is None


def test_itl_is_pooled_over_requests_and_failures_are_ignored():
    results = [ok(0.1, 0.3, 3, itl=[0.1, 0.1]), ok(0.2, 0.5, 4, itl=[0.1, 0.1, 0.1]),
               RequestResult(success=False, error="boom", ttft=9, latency=9)]
    samples = latency_samples(results)
    assert samples["itl"] == [0.1] * 5
    assert samples["ttft"] == [0.1, 0.2]
    assert samples["e2el"] == [0.3, 0.5]
    assert samples["tpot"] == pytest.approx([0.1, 0.1])


def test_summary_throughputs_and_keys():
    results = [ok(0.1, 1.0, 10, prompt_tokens=5), ok(0.3, 2.0, 20, prompt_tokens=5),
               RequestResult(success=False, error="HTTP 500: x")]
    summary = summarize(results, RunWindow(duration_s=2.0, server_cpu_s=0.5, bench_cpu_s=0.1, concurrency=2))
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["errors"] == ["HTTP 500: x"]
    assert summary["request_throughput"] == 1.0
    assert summary["output_throughput"] == 15.0
    assert summary["total_token_throughput"] == 20.0
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)
    assert summary["median_e2el_ms"] == pytest.approx(1500.0)
    assert summary["mean_tpot_ms"] == pytest.approx((900 / 9 + 1700 / 19) / 2)
    assert summary["server_cpu_ms_per_request"] == pytest.approx(250.0)
    assert summary["bench_cpu_ms_per_request"] == pytest.approx(50.0)
    assert summary["request_rate"] == "inf"
    assert summary["request_goodput"] is None


def test_peaks_of_concurrency_and_token_rate():
    results = [RequestResult(success=True, start_wall=0.0, latency=1.0, ttft=0.1, itl=[0.1] * 4),
               RequestResult(success=True, start_wall=0.5, latency=1.0, ttft=0.1, itl=[0.6]),
               RequestResult(success=True, start_wall=1.0, latency=0.5, ttft=0.1)]
    assert max_concurrent_requests(results) == 2  # the first ends exactly when the third starts
    assert max_output_tokens_per_s(results) == 6  # second 0: five chunks of the first, one of the second


def test_goodput_counts_requests_meeting_every_slo():
    results = [ok(0.1, 1.0, 10), ok(0.6, 1.0, 10), ok(0.1, 5.0, 10)]
    slos = parse_slos("ttft=0.5,tpot=0.2")
    assert [meets_slos(r, slos) for r in results] == [True, False, False]
    summary = summarize(results, RunWindow(duration_s=2.0), slos)
    assert summary["request_goodput"] == 0.5


@pytest.mark.parametrize("text", ["ttft", "speed=1", "ttft=fast"])
def test_bad_slos_are_rejected(text):
    with pytest.raises(ValueError):
        parse_slos(text)


def test_aggregate_over_repeats():
    summaries = [{"output_throughput": v, "failed": 0, "errors": [], "request_rate": "inf"} for v in (3.0, 1.0, 2.0)]
    aggregate = aggregate_repeats(summaries)
    assert aggregate["output_throughput"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert "errors" not in aggregate and "request_rate" not in aggregate


def test_zero_duration_is_an_error():
    with pytest.raises(ValueError):
        summarize([], RunWindow(duration_s=0.0))
    assert math.isinf(RunWindow(duration_s=1).request_rate)


def test_itl_split_by_other_requests_prefill():
    from scalellm.bench.metrics import split_itl_by_prefill

    # A decodes from t=1.0 with gaps ending at 1.1, 1.2, 1.5, 1.6; B is sent at 1.25 and
    # gets its first token at 1.45: only A's gap 1.2 -> 1.5 overlaps B's wait.
    a = RequestResult(success=True, start_wall=0.9, ttft=0.1, itl=[0.1, 0.1, 0.3, 0.1], output_tokens=5)
    b = RequestResult(success=True, start_wall=1.25, ttft=0.2, itl=[0.05], output_tokens=2)
    during, outside = split_itl_by_prefill([a, b])
    assert during == [pytest.approx(0.3)]
    assert sorted(outside) == pytest.approx([0.05, 0.1, 0.1, 0.1])
    # A request sent after A's last token overlaps none of A's gaps, nor A its own.
    c = RequestResult(success=True, start_wall=1.65, ttft=0.1, itl=[0.1], output_tokens=2)
    during, _ = split_itl_by_prefill([a, c])
    assert during == []
    assert split_itl_by_prefill([a]) == ([], [pytest.approx(g) for g in a.itl])


def test_summary_reports_isolation_figures():
    window = RunWindow(duration_s=2.0, server_cpu_s=3.0, bench_cpu_s=0.5, other_cpu_s=1.0, steal_s=0.25)
    summary = summarize([ok(0.1, 0.5, 5, itl=[0.1] * 4)], window)
    assert summary["other_cpu_seconds"] == 1.0 and summary["other_cpu_share"] == 0.5
    assert summary["steal_cpu_seconds"] == 0.25
    assert summary["num_itl_during_prefill"] == 0 and summary["median_itl_outside_prefill_ms"] == pytest.approx(100)
    assert summary["p99_itl_during_prefill_ms"] is None  # no overlap: no figure, not 0
    assert summarize([ok(0.1, 0.5, 5)], RunWindow(duration_s=1.0))["other_cpu_share"] is None
