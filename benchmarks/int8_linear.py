"""Micro-benchmark of the fused W8A8 linear op against the torch path it replaces (quantize the
activations, torch._int_mm, dequantize), on the projections of SmolLM2-135M.

Each row is one projection at M tokens: microseconds per call (best of 5) and int8 GOPS. The
per-step line adds the 30 layers' four projections and the LM head (decode batches only).

    .venv/bin/python benchmarks/int8_linear.py --threads 1 --tokens 1,32,128
"""

from __future__ import annotations

import argparse
import time

import torch

from scalellm.engine.layers.kernels import load_int8_linear
from scalellm.engine.quantization.int8 import int8_linear, pack_for_vnni, quantize_rows

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
"""name -> (in_features, out_features)"""
NUM_LAYERS = 30


def best_time_us(fn, work: float) -> float:
    repeats = max(3, int(2000 / (work / 1e6 + 10)))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return 1e6 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", default="1,32,128", help="comma-separated M values")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fused = load_int8_linear()
    if fused is None:
        raise SystemExit("the int8_linear kernel cannot be built here")
    gen = torch.Generator().manual_seed(0)
    for m in (int(t) for t in args.tokens.split(",")):
        totals = {"fused": 0.0, "torch": 0.0}
        for name, (k, n) in SHAPES.items():
            if name == "lm_head" and m > 32:
                continue  # the head sees the last token of each request only
            weight_q, scales = quantize_rows(torch.randn(n, k, generator=gen) * 0.05)
            packed, compensation = pack_for_vnni(weight_q)
            x = torch.randn(m, k, generator=gen).bfloat16()
            work = m * n * k
            calls = 1 if name == "lm_head" else NUM_LAYERS
            line = f"M={m:4d} {name:8s}"
            for label, fn in (("fused", lambda: fused(x, packed, compensation, scales, None, n)),
                              ("torch", lambda: int8_linear(x, weight_q.t(), scales, None))):
                us = best_time_us(fn, work)
                totals[label] += us * calls
                line += f"  {label} {us:9.1f} us {2 * work / us / 1e3:5.0f} GOPS"
            print(line)
        print(f"M={m:4d} per step: fused {totals['fused'] / 1e3:.2f} ms, torch {totals['torch'] / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
