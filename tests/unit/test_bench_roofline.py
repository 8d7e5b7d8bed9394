"""The roofline's arithmetic: model facts, bytes and FLOPs per request, forward passes seen, fractions."""

from __future__ import annotations

import pytest

from scalellm.bench import roofline
from scalellm.bench.client import RequestResult
from scalellm.bench.peer_install import default_gguf_path
from scalellm.bench.roofline import ModelFacts

# A toy model: 2 layers, 4 heads of 8 (2 KV heads), blocks of 1,000 parameters, a head of 500.
FACTS = ModelFacts(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, body_params=1000, head_params=500,
                   body_gguf_bytes=600, head_gguf_bytes=300, body_rows=40, head_rows=10)
PROBE = {"memory_bandwidth": {"all_cores_gb_s": 10.0, "one_core_gb_s": 8.0},
         "matmul": {"fp32": {"peak_gflop_s": 100.0}, "bf16": {"peak_gflop_s": 400.0},
                    "int8": {"peak_gflop_s": 800.0}}}


def test_weight_bytes_per_served_format():
    assert FACTS.weight_bytes("gguf") == 900
    assert FACTS.weight_bytes("bf16") == FACTS.weight_bytes("fp16") == 3000
    assert FACTS.weight_bytes("fp32") == 6000
    assert FACTS.weight_bytes("int8") == 1500 + 4 * 50  # a byte a parameter, a float32 scale a row
    with pytest.raises(ValueError, match="unknown weight format"):
        FACTS.weight_bytes("q4")


def test_kv_and_flops_of_one_request():
    assert FACTS.kv_bytes_per_position == 2 * 2 * 2 * 8 * 2  # K and V, layers, kv heads, head_dim, bf16
    assert FACTS.attention_flops_per_position == 4 * 2 * 4 * 8
    # 3 prompt tokens, 2 output tokens: output token j reads 3 + j positions (4 and 5).
    assert roofline.request_kv_bytes(FACTS, 3, 2) == FACTS.kv_bytes_per_position * 9
    # blocks: 2 x 1000 x 5 tokens; head: 2 x 500 x 2 outputs; attention over 1 + 2 + 3 + 4 + 5 positions.
    assert roofline.request_flops(FACTS, 3, 2) == 10_000 + 2_000 + 256 * 15
    assert roofline.request_flops(FACTS, 3, 0) == 6_000 + 256 * 6


def test_forward_passes_are_clusters_of_token_arrivals():
    # Two streams decoding in lockstep 10 ms apart: each pair of arrivals 0.2 ms apart is one pass.
    times = sorted([k * 0.010 for k in range(5)] + [k * 0.010 + 0.0002 for k in range(5)])
    assert roofline.count_steps(times, median_itl_s=0.010) == 5
    # Two replicas stepping out of phase: twice the passes.
    times = sorted([k * 0.010 for k in range(5)] + [k * 0.010 + 0.005 for k in range(5)])
    assert roofline.count_steps(times, median_itl_s=0.010) == 10
    assert roofline.count_steps([], 0.01) == 0


def lockstep_requests(num_streams: int, num_tokens: int, itl: float, prompt_tokens: int) -> list[RequestResult]:
    return [RequestResult(success=True, start_wall=1000.0 + 0.0001 * i, ttft=0.05, latency=0.05 + itl * (num_tokens - 1),
                          itl=[itl] * (num_tokens - 1), prompt_tokens=prompt_tokens, output_tokens=num_tokens)
            for i in range(num_streams)]


def test_run_roofline_against_the_probe():
    results = lockstep_requests(num_streams=4, num_tokens=11, itl=0.01, prompt_tokens=3)
    row = roofline.run_roofline(FACTS, "bf16", results, duration_s=0.2, probe=PROBE)
    assert row["steps"] == 11 and row["steps_per_s"] == pytest.approx(55.0)
    kv = 4 * roofline.request_kv_bytes(FACTS, 3, 11)
    assert row["achieved_gb_s"] == pytest.approx((11 * 3000 + kv) / 0.2 / 1e9)
    flops = 4 * roofline.request_flops(FACTS, 3, 11)
    assert row["achieved_gflop_s"] == pytest.approx(flops / 0.2 / 1e9)
    assert row["bandwidth_fraction"] == pytest.approx(row["achieved_gb_s"] / 10.0)
    assert row["compute_fraction"] == pytest.approx(row["achieved_gflop_s"] / 400.0)  # bf16's peak
    assert row["tpot_floor_ms"] == pytest.approx(3000 / 10e9 * 1000)
    gguf = roofline.run_roofline(FACTS, "gguf", results, duration_s=0.2, probe=PROBE)
    assert gguf["peak_dtype"] == "int8" and gguf["compute_fraction"] == pytest.approx(gguf["achieved_gflop_s"] / 800)
    unprobed = roofline.run_roofline(FACTS, "bf16", results, duration_s=0.2, probe=None)
    assert unprobed["bandwidth_fraction"] is None and unprobed["achieved_gb_s"] == row["achieved_gb_s"]


def test_failed_requests_count_nothing():
    results = lockstep_requests(2, 5, 0.01, 3)
    results[1].success = False
    alone = roofline.run_roofline(FACTS, "bf16", results[:1], 1.0)
    assert roofline.run_roofline(FACTS, "bf16", results, 1.0)["achieved_gflop_s"] == alone["achieved_gflop_s"]


def test_served_format_from_flag_server_or_command_line():
    assert roofline.parse_weight_kinds(["scalellm=int8", "vllm=bf16"]) == {"scalellm": "int8", "vllm": "bf16"}
    with pytest.raises(ValueError, match="SYSTEM=FORMAT"):
        roofline.parse_weight_kinds(["scalellm=q4"])
    assert roofline.infer_weight_kind("vllm", [])[0] == "bf16"
    assert roofline.infer_weight_kind("llamacpp", [])[0] == "gguf"
    assert roofline.infer_weight_kind("s", ["scalellm", "serve", "--quantization", "int8"])[0] == "int8"
    assert roofline.infer_weight_kind("s", ["scalellm", "serve", "--dtype", "float32"])[0] == "fp32"
    kind, why = roofline.infer_weight_kind("scalellm", ["scalellm", "serve"])
    assert kind == "gguf" and why.startswith("assumed")
    log = ["2026 INFO quantization auto: none (weights in the model's dtype)"]
    assert roofline.weight_format_from_log(log) == "bf16"
    assert roofline.weight_format_from_log(["2026 INFO quantization auto: none (weights in float32)"]) == "fp32"
    assert roofline.weight_format_from_log(["quantization auto: none (weights in bfloat16)"]) == "bf16"
    assert roofline.weight_format_from_log(["quantization auto: gguf (the file's ...)"]) == "gguf"
    assert roofline.weight_format_from_log(["nothing"]) is None

    class Point:
        def __init__(self, system):
            self.system, self.requests, self.summary = system, lockstep_requests(1, 3, 0.01, 2), {"duration": 1.0}

    points = [Point("a"), Point("b"), Point("c"), Point("d")]
    systems = {"a": {"argv": ["x", "--quantization", "int8"]}, "b": {"weight_format": "gguf"}, "c": {},
               "d": {"log_notes": ["quantization auto: none (weights in the model's dtype)"]}}
    assumptions = roofline.apply_roofline(points, systems, FACTS, PROBE, {"c": "fp32"})
    assert [assumptions[n]["weights"] for n in "abcd"] == ["int8", "gguf", "fp32", "bf16"]
    assert "log" in assumptions["d"]["why"]
    assert "server" in assumptions["b"]["why"] and "--weights" in assumptions["c"]["why"]
    assert points[1].summary["roofline_achieved_gb_s"] > 0 and "roofline_bandwidth_fraction" in points[0].summary


def test_facts_of_the_default_model_gguf():
    facts = ModelFacts.from_gguf(default_gguf_path())  # SmolLM2-135M-Instruct, Q4_1
    assert (facts.num_layers, facts.num_heads, facts.num_kv_heads, facts.head_dim) == (30, 9, 3, 64)
    assert facts.head_params == 49152 * 576  # tied: the embedding matrix is the head
    assert 130e6 < facts.body_params + facts.head_params < 140e6
    # Q4_1 stores 20 bytes per 32 weights (some tensors are kept at higher precision).
    assert 0.55 < facts.weight_bytes("gguf") / (facts.body_params + facts.head_params) < 1.0
