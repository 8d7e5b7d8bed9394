"""Micro-benchmark of decode attention alone: the torch path (gather + SDPA) vs the C++ kernel.

One "step" is num_layers calls of decode attention for a batch of one-token queries over a
shuffled paged cache (one cache per layer, as in the engine). Shapes default to SmolLM2-135M
(H=9, KH=3, D=64, 30 layers) at 64 concurrent decodes with contexts of 100-200 tokens.

    .venv/bin/python benchmarks/decode_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from scalellm.engine.layers.attention import DECODE_BACKENDS, AttentionMetadata
from scalellm.engine.layers.kernels import load_paged_attention


def make_step(args, dtype: torch.dtype, gen: torch.Generator):
    """Per-layer caches, a shuffled block table and the metadata both paths read."""
    context_lens = torch.randint(args.min_context, args.max_context + 1, (args.batch,), generator=gen)
    max_blocks = (int(context_lens.max()) + args.block_size - 1) // args.block_size
    num_cache_blocks = args.batch * max_blocks + 1
    table = torch.randperm(num_cache_blocks, generator=gen)[:args.batch * max_blocks].view(args.batch, max_blocks)
    key_positions = torch.arange(max_blocks * args.block_size).unsqueeze(0)
    mask = (key_positions < context_lens.unsqueeze(1))[:, None, None, :]
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long), num_decode_tokens=args.batch,
                             block_size=args.block_size, decode_block_table=table, decode_mask=mask,
                             decode_context_lens=context_lens)
    shape = (num_cache_blocks * args.block_size, args.kv_heads, args.head_dim)
    caches = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
              for _ in range(args.layers)]
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=gen).to(dtype)
    return q, caches, meta


def time_backend(backend: str, q, caches, meta, repeats: int) -> float:
    """Median milliseconds of one step (all layers) with `backend`."""
    meta.decode_backend = backend
    attend = DECODE_BACKENDS[backend]
    samples = []
    for i in range(repeats + 2):  # two warm-up steps
        start = time.perf_counter()
        for k_cache, v_cache in caches:
            attend(q, k_cache, v_cache, meta)
        if i >= 2:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 64), ("layers", 30), ("heads", 9), ("kv-heads", 3), ("head-dim", 64),
                          ("block-size", 16), ("min-context", 100), ("max-context", 200),
                          ("threads", 2), ("repeats", 20)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if load_paged_attention() is None:
        raise SystemExit("the C++ kernel cannot be built here; see the warning above")
    print(f"kernel load (compile if not cached): {time.perf_counter() - start:.1f} s")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            q, caches, meta = make_step(args, dtype, gen)
            ms = {backend: time_backend(backend, q, caches, meta, args.repeats) for backend in ("torch", "cpp")}
            print(f"{str(dtype):15s} torch {ms['torch']:7.2f} ms/step   cpp {ms['cpp']:7.2f} ms/step   "
                  f"speed-up {ms['torch'] / ms['cpp']:.1f}x")


if __name__ == "__main__":
    main()
