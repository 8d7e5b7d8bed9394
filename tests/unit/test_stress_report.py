"""The soak's verdict: failed requests, blocks left behind and growing memory each fail it."""

from __future__ import annotations

import json

from scalellm.bench.stress_report import judge, rss_summary, write_report


def result(failed=0, blocks=0, running=0, growth_mib_per_sample=0.0, exit_code=0) -> dict:
    samples = [{"t": 10.0 * i, "rss_mib": {"gateway": 50.0, "replica a:1": 1000.0 + growth_mib_per_sample * i}}
               for i in range(61)]
    return {"config": {"replicas": 1, "engine": "real", "quantization": "int8", "concurrency": 128,
                       "min_tokens": 16, "max_tokens": 64},
            "model": "m", "load_seconds": 600.0, "samples": samples, "serve_exit_code": exit_code,
            "requests": {"sent": 100, "succeeded": 100 - failed, "failed": failed, "output_tokens": 4000,
                         "by_kind": {"chat/stream": {"sent": 100, "failed": failed}},
                         "errors": ["chat/stream: HTTP 503"] if failed else []},
            "after_load": {"a:1": {"kv_blocks_in_use": blocks, "kv_blocks_total": 100, "running": running,
                                   "waiting": 0}}}


def test_a_clean_run_passes():
    verdict = judge(result())
    assert verdict["passed"] and all(verdict["checks"].values())


def test_each_loss_fails_its_check():
    assert judge(result(failed=1))["checks"] == {**judge(result())["checks"], "no_failed_requests": False}
    assert not judge(result(blocks=3))["checks"]["kv_blocks_back_to_zero"]
    assert not judge(result(running=1))["checks"]["no_request_left"]
    assert not judge(result(exit_code=1))["checks"]["clean_shutdown"]


def test_memory_growing_through_the_second_half_is_not_flat():
    leaking = rss_summary(result(growth_mib_per_sample=3.0)["samples"], 600.0)["replica a:1"]
    assert leaking["second_half_growth_mib"] == 90.0 and leaking["second_half_slope_mib_per_min"] == 18.0
    assert not leaking["flat"] and not judge(result(growth_mib_per_sample=3.0))["passed"]
    assert rss_summary(result(growth_mib_per_sample=1.0)["samples"], 600.0)["replica a:1"]["flat"]


def test_report_files(tmp_path):
    data = result(failed=1)
    data["verdict"] = judge(data)
    json_path, markdown_path, plot_path = write_report(data, str(tmp_path))
    assert json.loads(json_path.read_text())["requests"]["failed"] == 1
    markdown = markdown_path.read_text()
    assert "| **all** | **100** | **1** |" in markdown and "| no_failed_requests | FAIL |" in markdown
    assert plot_path.stat().st_size > 1000
