"""The bench's stepped load (--load-steps): schedule, per-step summaries, timeline, report."""

from __future__ import annotations

import argparse

import pytest

from scalellm.bench.client import RequestResult
from scalellm.bench.steps import LoadStep, StepClock, StepRun, parse_load_steps, summarize_steps, timeline
from scalellm.bench.steps_report import steps_document, write_steps_report

STEPS = (LoadStep(1, 10.0), LoadStep(4, 20.0), LoadStep(1, 10.0))


def test_parse_load_steps():
    assert parse_load_steps("1:60, 64:120,1:60") == (LoadStep(1, 60.0), LoadStep(64, 120.0), LoadStep(1, 60.0))
    for bad in ("", "64", "0:10", "4:0", "4:x", "a:1", "4:inf"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            parse_load_steps(bad)


def test_clock_knows_the_step_and_when_a_worker_is_needed_again():
    clock = StepClock(STEPS)
    assert clock.total_s == 40.0
    assert [clock.step_at(t) for t in (0, 9.99, 10, 29.9, 30, 39.9, 40)] == [0, 0, 1, 1, 2, 2, None]
    assert clock.next_active(0, 5.0) == 10.0  # worker 0 runs in every step
    assert clock.next_active(3, 5.0) == 10.0 and clock.next_active(3, 12.0) is None
    assert clock.next_active(4, 0.0) is None


def result(start: float, latency: float, tokens: int = 4, success: bool = True) -> RequestResult:
    gap = (latency - 0.1) / (tokens - 1)
    return RequestResult(success=success, start_wall=1000.0 + start, ttft=0.1, latency=latency,
                         itl=[gap] * (tokens - 1), output_tokens=tokens if success else 0, prompt_tokens=5,
                         error="" if success else "boom")


def synthetic_run() -> StepRun:
    # step 0: one request per 1 s; step 1: four in flight, 2 s each; step 2: one failure and one late finisher
    results = [(0, result(t, 1.0)) for t in range(10)]
    results += [(1, result(10 + t, 2.0)) for t in range(0, 20, 2) for _ in range(4)]
    results += [(2, result(30, 1.0, success=False)), (2, result(39.5, 2.5))]
    return StepRun(1000.0, results, [(0.0, "1x2"), (14.0, "2x1"), (35.0, "1x2")])


def test_each_step_is_summarized_over_its_own_requests_and_window():
    rows = summarize_steps(synthetic_run(), STEPS)
    assert [(r["step"], r["concurrency"], r["start_s"]) for r in rows] == [(0, 1, 0.0), (1, 4, 10.0), (2, 1, 30.0)]
    first, second, third = (r["summary"] for r in rows)
    assert first["completed"] == 10 and first["output_throughput"] == pytest.approx(40 / 10)
    assert first["median_e2el_ms"] == pytest.approx(1000.0)
    assert second["completed"] == 40 and second["output_throughput"] == pytest.approx(160 / 20)
    assert third["failed"] == 1 and third["duration"] == pytest.approx(12.0)  # ran past the step's end


def test_timeline_buckets_tokens_latencies_and_shapes():
    rows = timeline(synthetic_run(), STEPS, bucket_s=5.0)
    assert [row["t"] for row in rows] == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    assert [row["concurrency"] for row in rows] == [1, 1, 4, 4, 4, 4, 1, 1, 0]
    assert rows[0]["output_throughput"] == pytest.approx(20 / 5)
    assert rows[2]["output_throughput"] == pytest.approx(4 * 4 * 2.5 / 5, rel=0.25)
    assert rows[3]["median_e2el_ms"] == pytest.approx(2000.0)
    assert [row["shape"] for row in rows] == ["1x2", "1x2", "1x2", "2x1", "2x1", "2x1", "2x1", "1x2", "1x2"]
    assert rows[-1]["completed"] == 1  # the late finisher ends in the bucket after the schedule


def test_report_files(tmp_path):
    run = synthetic_run()
    document = steps_document({"workload": "w"}, {"auto": {}},
                              {"auto": (summarize_steps(run, STEPS), timeline(run, STEPS), run.shapes)})
    paths = write_steps_report(tmp_path, document)
    assert [p.name for p in paths] == ["results.json", "results.md", "timeline.png"]
    text = (tmp_path / "results.md").read_text()
    assert "| auto | 2 | 4 | 20 | 8.0 | 2000 |" in text
    assert "Shapes of auto: 1x2 at 0 s, 2x1 at 14 s, 1x2 at 35 s" in text
    assert paths[2].read_bytes()[:4] == b"\x89PNG"


def test_settled_summaries_leave_out_the_start_of_each_step():
    rows = summarize_steps(synthetic_run(), STEPS, settle_s=6.0)
    first, second, third = (row["settled"] for row in rows)
    assert first["completed"] == 4 and first["duration"] == pytest.approx(4.0)  # sent at 6..9 s
    assert second["completed"] == 28 and second["output_throughput"] == pytest.approx(112 / 14)
    assert third["completed"] == 1 and third["failed"] == 0
    assert summarize_steps(synthetic_run(), STEPS, settle_s=15.0)[0]["settled"] is None
    assert "settled" not in summarize_steps(synthetic_run(), STEPS)[0]
