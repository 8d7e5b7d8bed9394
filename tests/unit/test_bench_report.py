"""Breakdown stages, datasets, ratios, system commands and the written report."""

import math

import orjson
import pytest

from scalellm.bench import compare, datasets, peers
from scalellm.bench.breakdown import breakdown_table, stage_durations
from scalellm.bench.client import ClientConfig, RequestResult, build_body, normalize_base_url
from scalellm.bench.report import format_spread, write_report
from scalellm.bench.runner import BenchPlan, PointResult, point_requests, results_document


def timed(timings, start=100.0, latency=1.0):
    return RequestResult(success=True, start_wall=start, latency=latency, ttft=0.2, output_tokens=4,
                         timings=timings)


def test_breakdown_stages():
    result = timed({"gateway_receive": 100.01, "routed": 100.02, "replica_receive": 100.03,
                    "scheduled": 100.10, "first_token": 100.20, "last_token": 100.90,
                    "gateway_send": 100.95})
    stages = {k: v[0] for k, v in stage_durations([result]).items() if v}
    assert stages["client -> gateway"] == pytest.approx(0.01)
    assert stages["gateway in"] == pytest.approx(0.01)
    assert stages["transport"] == pytest.approx(0.01)
    assert stages["pre-schedule"] == pytest.approx(0.07)
    assert stages["prefill"] == pytest.approx(0.10)
    assert stages["decode"] == pytest.approx(0.70)
    assert stages["gateway out"] == pytest.approx(0.05)
    assert stages["to client"] == pytest.approx(0.05)
    assert stages["after last token"] == pytest.approx(0.10)
    assert "tokenize" not in stages


def test_breakdown_splits_tokenize_and_queue_and_skips_unreported_stages():
    result = timed({"replica_receive": 100.0, "queued": 100.02, "scheduled": 100.05, "routed": 0})
    stages = {k: v for k, v in stage_durations([result, RequestResult(success=True)]).items() if v}
    assert set(stages) == {"tokenize", "queue"}
    assert stages["tokenize"][0] == pytest.approx(0.02)
    rows = breakdown_table([result])
    assert [row["stage"] for row in rows] == ["tokenize", "queue"]


def test_random_requests_are_seeded_words():
    first = datasets.random_requests(3, input_len=48, output_len=64, seed=7)
    assert first == datasets.random_requests(3, input_len=48, output_len=64, seed=7)
    assert all(len(spec.prompt.split()) == 48 and spec.max_tokens == 64 for spec in first)
    assert first != datasets.random_requests(3, seed=8)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n')
    specs = datasets.load_jsonl(path, output_len=9)
    assert specs[0].prompt == "hello" and specs[0].max_tokens == 9
    assert specs[1].messages[0]["content"] == "hi" and specs[1].max_tokens == 5
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        datasets.load_jsonl(tmp_path / "bad.jsonl")


def test_points_draw_distinct_prompts_and_systems_share_them():
    plan = BenchPlan(concurrencies=(1, 4), num_warmup=2)
    assert len(point_requests(plan, 4, 0)) == 2 + 16
    assert point_requests(plan, 1, 0) == point_requests(plan, 1, 0)
    assert point_requests(plan, 1, 0) != point_requests(plan, 1, 1)


def test_request_body_follows_the_standard_workload():
    client = ClientConfig(base_url=normalize_base_url("http://h:1/v1/chat/completions"), model="m")
    assert client.url == "http://h:1/v1/chat/completions"
    body = orjson.loads(build_body(datasets.RequestSpec(prompt="a b", max_tokens=64), client))
    assert body == {"model": "m", "max_tokens": 64, "temperature": 0.0, "stream": True,
                    "messages": [{"role": "user", "content": "a b"}],
                    "stream_options": {"include_usage": True}, "ignore_eos": True}
    with pytest.raises(ValueError):
        normalize_base_url("localhost:8000")


def test_ratios_against_the_baseline():
    def row(system, throughput):
        return {"system": system, "concurrency": 16,
                "metrics": {"output_throughput": {"median": throughput, "min": 0, "max": 0},
                            "median_ttft_ms": {"median": 10.0, "min": 0, "max": 0}}}
    ratios = compare.compute_ratios([row("scalellm", 300.0), row("vllm", 150.0)], "scalellm")
    assert ratios == [{"baseline": "scalellm", "peer": "vllm", "concurrency": 16, "output_throughput": 2.0,
                       "median_ttft_ms": 1.0, "median_e2el_ms": None, "server_cpu_ms_per_request": None}]


def test_system_commands_and_names():
    custom = peers.parse_system_commands(["scalellm-direct={scalellm} serve --port {port} --direct"])
    spec = peers.prepare_system("scalellm-direct", None, custom)
    assert spec.argv(8123, "m.gguf")[1:] == ["serve", "--port", "8123", "--direct"]
    with pytest.raises(ValueError):
        peers.parse_system_commands(["noport=run me"])
    with pytest.raises(ValueError, match="unknown system"):
        compare.check_systems(["scalellm", "tgi"], custom)


def test_spread_format():
    assert format_spread({"median": 2.0, "min": 1.0, "max": 3.0}, "{:.1f}") == "2.0 (1.0–3.0)"
    assert format_spread({"median": 2.0, "min": 2.0, "max": 2.0}, "{:.1f}") == "2.0"
    assert format_spread(None, "{:.1f}") == "-"


def test_report_files(tmp_path):
    points = []
    for system, scale in (("scalellm", 1.0), ("vllm", 2.0)):
        for concurrency in (1, 4):
            requests = [RequestResult(success=True, ttft=0.05 * scale * (i + 1), latency=0.5 * scale,
                                      output_tokens=8, prompt_tokens=10) for i in range(4)]
            summary = {"output_throughput": 100 / scale * concurrency, "request_throughput": 3.0,
                       "median_ttft_ms": 50 * scale, "p99_ttft_ms": 80 * scale, "median_e2el_ms": 500 * scale,
                       "p99_e2el_ms": 600 * scale, "failed": 0, "errors": [], "breakdown": []}
            points.append(PointResult(system, concurrency, 0, summary, requests))
    document = results_document({"workload": "test"}, {}, points)
    document["ratios"] = compare.compute_ratios(document["aggregates"], "scalellm")
    files = write_report(tmp_path, document)
    markdown = (tmp_path / "results.md").read_text()
    assert "| scalellm vs vllm | 4 | 2.00 | 0.50 | 0.50 | - |" in markdown
    assert all(path.stat().st_size > 0 for path in files) and len(files) == 5
    assert not math.isnan(orjson.loads((tmp_path / "results.json").read_bytes())["runs"][0]["requests"][0]["ttft"])


def test_progress_line_draws_only_when_enabled():
    import io

    from scalellm.bench.progress import ProgressLine

    stream = io.StringIO()
    line = ProgressLine(2, "x C=1", stream=stream, enabled=True, interval_s=0.0)
    line.update(RequestResult(success=True))
    line.update(RequestResult(success=False))
    line.close()
    assert "x C=1 2/2 done, 1 failed" in stream.getvalue()
    quiet = io.StringIO()
    ProgressLine(1, stream=quiet).update(RequestResult(success=True))  # StringIO is not a TTY
    assert quiet.getvalue() == ""
