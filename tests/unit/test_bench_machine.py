"""The machine probe: its arithmetic, its parsing, and that it measures something real."""

from __future__ import annotations

import json

import pytest

from scalellm.bench import machine

CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480C
flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8
"""

VERBOSE = """onednn_verbose,v1,info,oneDNN v3.7.1 (commit x)
onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with AVX512BW, AVX512VL, and AVX512DQ extensions and Intel AMX
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0,,,256x512:512x512,0.31
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0,,,256x512:512x512,0.2
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx_int8,undef,src:s8::blocked:ab::f0,,,256x512:512x512,0.1
"""


def test_matmul_flops_and_rate():
    assert machine.matmul_flops(64, 2048, 2048) == 2 * 64 * 2048 * 2048
    assert machine.rate(10.0, 2.0) == 5.0 and machine.rate(10.0, 0.0) == 0.0


def test_best_seconds_keeps_the_fastest_call():
    calls = []
    durations = iter([0.0, 0.03, 0.01, 0.02])

    def run():
        import time
        calls.append(1)
        time.sleep(next(durations))

    best = machine.best_seconds(run, repeats=3)
    assert len(calls) == 4  # one untimed call first
    assert 0.009 < best < 0.02


def test_cpu_facts_from_cpuinfo():
    facts = machine.cpu_facts(CPUINFO)
    assert facts["model"] == "Intel(R) Xeon(R) Platinum 8480C" and facts["logical_cpus"] == 2
    assert facts["flags"]["amx_tile"] and facts["flags"]["avx512_vnni"] and not facts["flags"]["avx512_fp16"]


def test_onednn_kernels_from_verbose_lines():
    assert machine.onednn_kernels(VERBOSE) == ["brg_matmul:avx10_1_512_amx", "brg_matmul:avx10_1_512_amx_int8"]
    assert machine.onednn_kernels("nothing here\n") == []


def test_probe_measures_a_real_machine(tmp_path):
    probe = machine.probe_machine(buffer_bytes=64 << 20, shapes=((64, 256, 256),), repeats=2)
    bandwidth = probe["memory_bandwidth"]
    assert 0.5 < bandwidth["one_core_gb_s"] < 2000 and 0.5 < bandwidth["all_cores_gb_s"] < 2000
    for dtype in machine.DTYPES:
        assert probe["matmul"][dtype]["peak_gflop_s"] > 0.1
    assert probe["kernels"]["torch_cpu_capability"]
    int8 = probe["matmul"]["int8"]
    if "kernel_gflop_s_by_shape" in int8:  # the project's VNNI kernel built here
        assert int8["peak_gflop_s"] == max(*int8["gflop_s_by_shape"].values(), *int8["kernel_gflop_s_by_shape"].values())
    assert probe["other_cpu_share"] is None or probe["other_cpu_share"] >= 0
    path = tmp_path / "machine.json"
    path.write_text(json.dumps(probe))
    assert machine.load_probe(path)["cores"] == probe["cores"]
    assert "streaming read" in machine.describe(probe)
    assert "WARNING" in machine.describe({**probe, "other_cpu_share": 1.5})
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a probe"):
        machine.load_probe(path)


def test_the_probe_counts_its_own_child_as_its_own_work():
    """kernel_isa runs a child: its CPU must not be read as other work (a false 'not quiet' warning)."""
    import subprocess
    import sys

    before = machine._own_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)
    assert machine._own_cpu_s() - before > 0.2
