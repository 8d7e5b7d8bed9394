"""Micro-benchmark of the GGUF-quantized linear op (weights in their file's codes) against the fused
W8A8 int8 op and a plain matrix multiply on the dequantized weights (the fallback, in the activations'
dtype), on the projections of a real GGUF, plus a streaming-read probe of memory bandwidth.

Each row is one projection at M tokens: microseconds per call (best of 5) and the weight bytes each
op streams per call. The per-step line adds every layer's projections and the LM head (M <= 16); at
M=1 the quantized op's figure is compared with the time to read its weights once at the measured
bandwidth (the floor for a memory-bound decode step).

Those rows time one projection over and over, so a matrix smaller than the L3 cache is read from it.
`--cold` times instead each projection's calls over every layer back to back after the caches are
flushed, as a decode step reads them (and the head once), and gives the rate its weights were read at.

    .venv/bin/python benchmarks/quantized_linear.py --threads 2 --tokens 1,16,64,256
    .venv/bin/python benchmarks/quantized_linear.py --model $(../shared/models/fetch.sh qwen2.5-coder-1.5b)
    .venv/bin/python benchmarks/quantized_linear.py --model ... --cold --tokens 1
"""

from __future__ import annotations

import argparse
import time

import torch

from scalellm.engine.device import resolve_dtype
from scalellm.engine.layers.kernels import load_int8_linear
from scalellm.engine.loader import default_model_path
from scalellm.engine.loader.gguf import GGUFFiles
from scalellm.engine.quantization.gguf import kernel_isa, kernel_op, pack
from scalellm.engine.quantization.gguf_blocks import KERNEL_TYPES, merge
from scalellm.engine.quantization.int8 import pack_for_vnni, quantize_rows

PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}


def best_time_us(fn) -> float:
    fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    repeats = max(2, int(0.2 / max(once, 1e-6)))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return 1e6 * min(times)


def stream_bandwidth_gbs(size_mib: int = 1024) -> float:
    """Bytes per second of a multithreaded streaming read (a sum over a buffer larger than the caches)."""
    data = torch.ones(size_mib << 18, dtype=torch.float32)
    return data.numel() * 4 / best_time_us(lambda: data.sum()) * 1e6 / 1e9


def layer_weights(weights: dict, layer: int) -> dict:
    """projection -> merged GroupCodes of layer `layer`; `weights`: the file's weights by name."""
    prefix = f"model.layers.{layer}."
    return {name: merge([weights[f"{prefix}{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}.weight"].codes()
                         for p in parts]) for name, parts in PROJECTIONS.items()}


def head_codes(weights: dict):
    """The output matrix's GroupCodes (the tied embedding's where the file has no lm_head)."""
    return weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).codes()


def packed_bytes(packs: tuple) -> int:
    """Bytes the quantized op reads for one call on pack()'s (packed, scales, minimums)."""
    packed, scales, minimums = packs
    return packed.numel() + 2 * scales.numel() * (2 if minimums is not None else 1)


def gguf_linear(op, x: torch.Tensor, codes, packs: tuple) -> torch.Tensor:
    """The quantized op on x and one matrix's pack()ed codes."""
    packed, scales, minimums = packs
    return op(x, packed, scales, minimums, None, codes.codes.shape[0], codes.bits, codes.group, codes.zero_point)


def cold_pass(weights: dict, num_layers: int, tokens: list[int], dtype: torch.dtype, quantized,
              bandwidth: float) -> None:
    """Per projection, its call in every layer back to back (the head once) after reading 256 MB to flush
    the caches: the median of 5 passes, and the rate its weights were read at."""
    calls: dict[str, list] = {}
    for layer in range(num_layers):
        for name, codes in layer_weights(weights, layer).items():
            calls.setdefault(name, []).append((codes, pack(codes)))
    head = head_codes(weights)
    calls["lm_head"] = [(head, pack(head))]
    flush = torch.ones(64 << 20)
    for m in tokens:
        total_ms = total_mb = 0.0
        for name, layers in calls.items():
            x = torch.randn(m, layers[0][0].codes.shape[1], dtype=dtype)
            mb = sum(packed_bytes(packs) for _, packs in layers) / 1e6
            times = []
            for _ in range(5):
                flush.sum()
                start = time.perf_counter()
                for codes, packs in layers:
                    gguf_linear(quantized, x, codes, packs)
                times.append(time.perf_counter() - start)
            ms = 1e3 * sorted(times)[2]
            total_ms, total_mb = total_ms + ms, total_mb + mb
            print(f"M={m:4d} {name:8s} x{len(layers):3d} cold  {ms:7.2f} ms  {mb:7.1f} MB  {mb / ms:5.1f} GB/s")
        print(f"M={m:4d} all cold: {total_ms:.2f} ms for {total_mb:.0f} MB ({total_mb / total_ms:.1f} GB/s; "
              f"streaming read {bandwidth:.1f} GB/s: {total_mb / bandwidth:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default="1,16,64,256", help="comma-separated M values")
    parser.add_argument("--cold", action="store_true", help="every layer's calls back to back, caches flushed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quantized, int8 = kernel_op(), load_int8_linear()
    if quantized is None or int8 is None:
        raise SystemExit("the kernels cannot be built here (the quantized one needs AVX512-VNNI or AVX2)")
    dtype = resolve_dtype("auto", torch.device("cpu"))  # the activations a served model would pass
    print(f"quantized kernel: {kernel_isa()}, activations {dtype}")
    files = GGUFFiles(args.model or default_model_path())
    bandwidth = stream_bandwidth_gbs()
    print(f"streaming read: {bandwidth:.1f} GB/s")
    weights = dict(files.iter_weights(KERNEL_TYPES))
    num_layers = files.config.num_layers
    if args.cold:
        return cold_pass(weights, num_layers, [int(t) for t in args.tokens.split(",")], dtype, quantized, bandwidth)
    shapes = {}
    for name, codes in {**layer_weights(weights, 0), "lm_head": head_codes(weights)}.items():
        packs = pack(codes)
        weight = torch.from_numpy(codes.dequantize())
        weight_q, w_scales = quantize_rows(weight)
        packed8, compensation = pack_for_vnni(weight_q)
        dense = weight.to(dtype)
        shapes[name] = (codes, packs, (packed8, compensation, w_scales), dense, packed_bytes(packs))
    for m in (int(t) for t in args.tokens.split(",")):
        totals = {"gguf": 0.0, "int8": 0.0, "dense": 0.0}
        weight_bytes = 0
        for name, (codes, packs, (packed8, compensation, w_scales), dense, nbytes) in shapes.items():
            if name == "lm_head" and m > 16:
                continue  # the head sees the last token of each request only
            n, k = codes.codes.shape
            x = torch.randn(m, k, dtype=dtype)
            calls = 1 if name == "lm_head" else num_layers
            weight_bytes += nbytes * calls
            gguf_us = best_time_us(lambda: gguf_linear(quantized, x, codes, packs))
            int8_us = best_time_us(lambda: int8(x, packed8, compensation, w_scales, None, n))
            dense_us = best_time_us(lambda: torch.nn.functional.linear(x, dense))
            totals["gguf"] += gguf_us * calls
            totals["int8"] += int8_us * calls
            totals["dense"] += dense_us * calls
            print(f"M={m:4d} {name:8s} [{n}x{k} {codes.bits}-bit/{codes.group}]  gguf {gguf_us:8.1f} us "
                  f"({nbytes / 1e6:6.2f} MB)  int8 {int8_us:8.1f} us ({packed8.numel() / 1e6:6.2f} MB)  "
                  f"dense {dense_us:8.1f} us")
        floor = weight_bytes / bandwidth / 1e6
        print(f"M={m:4d} per step: gguf {totals['gguf'] / 1e3:.2f} ms, int8 {totals['int8'] / 1e3:.2f} ms, "
              f"dense {totals['dense'] / 1e3:.2f} ms; "
              f"gguf weights {weight_bytes / 1e6:.0f} MB, read once at {bandwidth:.0f} GB/s: {floor:.2f} ms")


if __name__ == "__main__":
    main()
