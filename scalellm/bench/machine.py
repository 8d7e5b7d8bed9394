"""``scalellm bench --machine``: measure this machine's limits, the denominators of the roofline.

* Memory bandwidth: a streaming read of a buffer far larger than the last-level
  cache (1 GiB by default, touched once before timing so page faults are not
  counted), summed by torch's vectorized reduction on one thread and on every
  core; the best of several passes. A sum of float32 values needs one vector add
  per 64 bytes, far below what a core can issue, so the pass is bound by memory.
* Matrix-multiply peak: torch matmuls in fp32, bf16 and int8 (``torch._int_mm``)
  at a few shapes on every core, best of several calls, in GFLOP/s (int8: GOP/s,
  a multiply-add counted as two). int8 also times ScaleLLM's own int8 kernel
  (AVX512-VNNI, or the GGUF kernel's AVX2 path) where it builds; its peak is the better of the two.
  A dtype whose call takes over SLOW_CALL_S (bf16 on a CPU without AVX512-BF16) stops at that shape. oneDNN's verbose log of one bf16 and one int8
  call is captured in a child process to report which kernel and ISA ran
  (AMX where the CPU has it, AVX-512 VNNI/BF16 otherwise).
* How quiet the machine was: the cores other processes kept busy meanwhile
  (``other_cpu_share``, from /proc/stat); the probe warns above QUIET_SHARE.

The result is a JSON document (``probe_machine``); ``roofline.py`` divides a
run's achieved bandwidth and compute by it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GIB = 1 << 30
MATMUL_SHAPES = ((64, 2048, 2048), (256, 2048, 2048), (1024, 2048, 2048))
"""(M, K, N): a batched decode, a small prefill, a large prefill on a 2048-wide layer."""
DTYPES = ("fp32", "bf16", "int8")
SLOW_CALL_S = 1.0
"""A product slower than this (a dtype with no vector path on this CPU: bf16 without AVX512-BF16 runs at
well under 1 GFLOP/s) ends its dtype's series: the larger shapes would take minutes and no peak."""
QUIET_SHARE = 0.1
"""More cores than this busy elsewhere during a probe, on average, and its figures are not the machine's."""
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")


def matmul_flops(m: int, k: int, n: int) -> int:
    """Operations of an [M, K] x [K, N] product: one multiply and one add per (m, k, n)."""
    return 2 * m * k * n


def rate(amount: float, seconds: float) -> float:
    """amount / seconds, 0 for a non-positive time."""
    return amount / seconds if seconds > 0 else 0.0


def best_seconds(run, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (after one untimed call)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(num_bytes: int = GIB, threads: int = 1, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (a float32 sum) of ``num_bytes`` on ``threads`` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(num_bytes // 4, dtype=torch.float32)  # written once: every page is mapped
        seconds = best_seconds(lambda: buffer.sum(), repeats)
        return rate(buffer.numel() * 4, seconds)
    finally:
        torch.set_num_threads(previous)


def matmul_rate(dtype: str, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Operations per second of one [M, K] x [K, N] torch product in ``dtype`` (fp32, bf16, int8)."""
    import torch

    if dtype == "int8":
        a = torch.randint(-64, 64, (m, k), dtype=torch.int8)
        b = torch.randint(-64, 64, (k, n), dtype=torch.int8)
        seconds = best_seconds(lambda: torch._int_mm(a, b), repeats)
    else:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a, b = torch.randn(m, k, dtype=torch_dtype), torch.randn(k, n, dtype=torch_dtype)
        seconds = best_seconds(lambda: torch.matmul(a, b), repeats)
    return rate(matmul_flops(m, k, n), seconds)


def int8_kernel_rate(m: int, k: int, n: int, repeats: int = 5) -> float | None:
    """Operations per second of ScaleLLM's own W8A8 kernel (kernels/int8_linear.cpp, its AVX512-VNNI or
    AVX2 path) on one [M, K] x [K, N] product; None where it runs neither. torch's int8 matmul is not
    the fastest int8 path on every CPU, and a peak must be the best this machine reaches (on AVX2 this
    kernel measured 145-168 GOP/s where the GGUF kernel over 8-bit codes made 84-118)."""
    import torch

    from scalellm.engine.device import resolve_dtype
    from scalellm.engine.layers.kernels import load_int8_linear
    from scalellm.engine.quantization.gguf import kernel_isa
    from scalellm.engine.quantization.int8 import pack_for_vnni, quantize_rows

    fused = load_int8_linear() if kernel_isa() is not None else None
    if fused is None:
        return None
    weight_q, scales = quantize_rows(torch.randn(n, k) * 0.05)
    packed, compensation = pack_for_vnni(weight_q)
    x = torch.randn(m, k).to(resolve_dtype("auto", torch.device("cpu")))  # the activations a server gets
    seconds = best_seconds(lambda: fused(x, packed, compensation, scales, None, n), repeats)
    return rate(matmul_flops(m, k, n), seconds)


def cpu_facts(cpuinfo: str) -> dict:
    """Model name, logical CPUs and the SIMD/AMX flags that matter, from /proc/cpuinfo text."""
    model, flags, count = "", set(), 0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            count += 1
        elif key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "logical_cpus": count, "flags": {f: f in flags for f in CPU_FLAGS}}


def onednn_kernels(verbose_text: str) -> list[str]:
    """The distinct ``impl`` names (e.g. ``brg_matmul:avx10_1_512_amx``) of oneDNN's verbose 'exec' lines."""
    kernels = []
    for line in verbose_text.splitlines():
        parts = line.split(",")
        if len(parts) > 5 and parts[0].startswith("onednn_verbose") and "exec" in parts and "cpu" in parts:
            impl = parts[parts.index("cpu") + 2] if parts.index("cpu") + 2 < len(parts) else ""
            if impl and impl not in kernels:
                kernels.append(impl)
    return kernels


_ISA_SCRIPT = """
import torch
a = torch.randn(256, 512, dtype=torch.bfloat16); b = torch.randn(512, 512, dtype=torch.bfloat16)
torch.matmul(a, b)
x = torch.randint(-8, 8, (256, 512), dtype=torch.int8); y = torch.randint(-8, 8, (512, 512), dtype=torch.int8)
torch._int_mm(x, y)
print("torch_capability=" + torch.backends.cpu.get_cpu_capability(), flush=True)
"""


def kernel_isa() -> dict:
    """Which oneDNN kernels torch's bf16 and int8 matmuls ran, from a child with ONEDNN_VERBOSE=1."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"error": str(error)}
    capability = [line.split("=", 1)[1] for line in done.stdout.splitlines()
                  if line.startswith("torch_capability=")]
    isa_lines = [line for line in done.stdout.splitlines() if "cpu,runtime" in line or ",isa:" in line
                 or "info,cpu,isa" in line]
    return {"torch_cpu_capability": capability[0] if capability else "",
            "onednn_kernels": onednn_kernels(done.stdout),
            "onednn_isa": [line.split(",", 3)[-1] for line in isa_lines][:3]}


def probe_machine(buffer_bytes: int = GIB, shapes=MATMUL_SHAPES, repeats: int = 5) -> dict:
    """Measure bandwidth and matmul peaks; the JSON document ``--machine`` writes."""
    import torch

    from scalellm.bench.isolation import machine_cpu

    cores = len(os.sched_getaffinity(0))
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    machine_before, own_before, start = machine_cpu(), _own_cpu_s(), time.perf_counter()
    bandwidth = {"buffer_bytes": buffer_bytes,
                 "one_core_gb_s": read_bandwidth(buffer_bytes, 1, repeats) / 1e9,
                 "all_cores_gb_s": read_bandwidth(buffer_bytes, cores, repeats) / 1e9}
    matmul: dict = {}
    torch.set_num_threads(cores)
    for dtype in DTYPES:
        by_shape = rates_by_shape(lambda m, k, n: matmul_rate(dtype, m, k, n, repeats), shapes)
        matmul[dtype] = {"gflop_s_by_shape": {shape: r / 1e9 for shape, r in by_shape.items()},
                         "peak_gflop_s": max(by_shape.values()) / 1e9}
    kernel = rates_by_shape(lambda m, k, n: int8_kernel_rate(m, k, n, repeats), shapes)
    if kernel and all(value is not None for value in kernel.values()):
        matmul["int8"]["kernel_gflop_s_by_shape"] = {shape: value / 1e9 for shape, value in kernel.items()}
        matmul["int8"]["peak_gflop_s"] = max(matmul["int8"]["peak_gflop_s"], *(v / 1e9 for v in kernel.values()))
    return {"probed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
            "cores": cores, "torch": torch.__version__, "cpu": cpu_facts(cpuinfo),
            "memory_bandwidth": bandwidth, "matmul": matmul, "kernels": kernel_isa(),
            "other_cpu_share": _other_share(machine_before, machine_cpu(), _own_cpu_s() - own_before,
                                            time.perf_counter() - start)}


def rates_by_shape(measure, shapes) -> dict:
    """{"MxKxN": measure(m, k, n)} over the shapes in order, ending after one whose call took longer
    than SLOW_CALL_S (or that measure could not time: None)."""
    out: dict = {}
    for m, k, n in shapes:
        value = out[f"{m}x{k}x{n}"] = measure(m, k, n)
        if value is None or matmul_flops(m, k, n) / value > SLOW_CALL_S:
            break
    return out


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (kernel_isa's)."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def _other_share(before, after, own_cpu_s: float, seconds: float) -> float | None:
    """Cores busy on average with other work while the probe ran (a quiet machine: near 0)."""
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, after.busy_s - before.busy_s - own_cpu_s) / seconds


def describe(probe: dict) -> str:
    """A few lines for the terminal."""
    bw, mm = probe["memory_bandwidth"], probe["matmul"]
    flags = ", ".join(f for f, on in probe["cpu"]["flags"].items() if on)
    lines = [f"{probe['cpu']['model']} ({probe['cores']} cores usable): {flags}",
             f"streaming read: {bw['all_cores_gb_s']:.1f} GB/s on all cores, {bw['one_core_gb_s']:.1f} GB/s on one",
             "matmul peak: " + ", ".join(f"{d} {mm[d]['peak_gflop_s']:.0f} G{'OP' if d == 'int8' else 'FLOP'}/s"
                                         for d in mm),
             f"oneDNN kernels: {', '.join(probe['kernels'].get('onednn_kernels', [])) or 'none seen'}"]
    other = probe.get("other_cpu_share")
    if other is not None and other > QUIET_SHARE:
        lines.append(f"WARNING: other work kept {other:.2f} cores busy during the probe: these limits are low; "
                     "probe again on a quiet machine")
    return "\n".join(lines)


def default_probe_path() -> Path:
    """``~/.cache/scalellm/machine.json`` (beside the peers' cache)."""
    from scalellm.bench.peer_install import default_cache_dir

    return default_cache_dir().parent / "machine.json"


def load_probe(path: Path) -> dict:
    """A probe written by ``--machine`` (ValueError naming the problem)."""
    try:
        probe = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--machine-file {path}: cannot read a machine probe ({error})") from None
    if "memory_bandwidth" not in probe or "matmul" not in probe:
        raise ValueError(f"--machine-file {path}: not a probe written by `scalellm bench --machine`")
    return probe
