"""--verify-peer: the prompts and command handed to vLLM's own client, and the side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

from scalellm.bench import verify
from scalellm.bench.compare import log_notes
from scalellm.bench.runner import BenchPlan, point_requests


def test_own_tool_gets_exactly_our_measured_prompts(tmp_path):
    plan = BenchPlan(concurrencies=(4,), num_requests=6, num_warmup=2, output_len=32)
    path = tmp_path / "prompts.jsonl"
    assert verify.write_prompts(plan, 4, path) == 6
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ours = point_requests(plan, 4, 0)[2:]  # repeat 0, warm-up excluded
    assert [line["prompt"] for line in lines] == [spec.prompt for spec in ours]
    assert {line["output_tokens"] for line in lines} == {32}


def test_vllm_bench_command_matches_the_plan(tmp_path):
    plan = BenchPlan(concurrencies=(16,), output_len=64, num_warmup=2)
    argv = verify.vllm_bench_argv(Path("/v/python"), Path("/m"), "http://127.0.0.1:9", "default",
                                  Path("p.jsonl"), 64, 16, plan, tmp_path, "r.json")
    text = " ".join(argv)
    assert "vllm.benchmarks.serve" in argv[2]  # vllm bench serve's own code
    for part in ("--backend openai-chat", "--dataset-name custom", "--skip-chat-template",
                 "--custom-output-len 64", "--num-prompts 64", "--max-concurrency 16", "--request-rate inf",
                 "--ignore-eos", "--temperature 0", "--percentile-metrics ttft,tpot,itl,e2el", "--num-warmups 2", "--base-url http://127.0.0.1:9"):
        assert part in text, part


def test_figures_and_table():
    result = {"output_throughput": 100.0, "median_ttft_ms": 80.0, "median_tpot_ms": 30.0, "median_itl_ms": 29.0,
              "median_e2el_ms": 2000.0, "completed": 16, "other": 1}
    figures = verify.own_tool_figures(result)
    assert "other" not in figures and figures["completed"] == 16
    table = verify.check_table([{"system": "vllm", "concurrency": 1, "ours": figures, "own": {"error": "boom"}}])
    assert "| vllm | 1 | scalellm bench | 100.0 | 80 | 30.0 | 2000 |" in table
    assert "| vllm | 1 | own tool | boom" in table
    assert verify.check_table([]) == ""


def test_log_notes_keep_the_lines_about_threads(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text("noise\n(EngineCore) INFO OpenMP thread binding info:\n\tlocal_rank=0, core ids=[0]\n"
                   "system_info: n_threads = 2 | AVX512 = 1\nmore noise\n")
    assert log_notes(log) == ["(EngineCore) INFO OpenMP thread binding info:", "local_rank=0, core ids=[0]",
                              "system_info: n_threads = 2 | AVX512 = 1"]
    assert log_notes(tmp_path / "missing.log") == []
