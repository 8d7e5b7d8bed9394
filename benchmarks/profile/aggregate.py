"""Shares of the replicas' busy time by what they do, from py-spy's raw (collapsed) stacks.

    .venv/bin/python benchmarks/profile/aggregate.py STACKS.txt [...]

A sample is idle when its thread waits (epoll, a condition, an idle pool worker); every other sample
goes to the first category one of whose markers appears in its stack, so a kernel's OpenMP barrier
waits count with the kernel that called them.
"""

from __future__ import annotations

import collections
import sys

IDLE_LEAVES = ("epoll_wait", "epoll_pwait")
IDLE_FRAMES = ("Condition.wait", "Event.wait")
IDLE_WHEN_IN_LIBC = ("_worker (concurrent", "Runner.run")
"""Frames whose thread is waiting when its leaf is in libc (a pool worker, the asyncio loop)."""
CATEGORIES = {  # first match wins
    "GGUF linear kernel": ("quantized_linear", "tile<"),
    "decode attention kernel": ("paged_decode_attention", "attend_"),
    "prefill attention (SDPA)": ("_prefill_attention", "flash_attention"),
    "other matmuls": ("sgemm", "addmm", "mkl_"),
    "norm, rotary, SwiGLU": ("add_rms_norm", "rotary", "silu_and_mul", "rms_norm"),
    "KV write": ("write_kv",),
    "sampler": ("sampler.py",),
    "embedding lookup": ("vocab.py",),
    "engine Python (step inputs, scheduler, outputs, detokenizer)": (
        "scheduler.py", "step_inputs", "output_processor", "engine_core.py", "detokenizer", "input_processor",
        "model_runner.py"),
    "gRPC and asyncio": ("rpc/", "asyncio", "grpc"),
    "other model Python": ("models/", "layers/"),
}


def is_idle(stack: str, leaf: str) -> bool:
    if leaf.startswith(IDLE_LEAVES) or any(frame in stack for frame in IDLE_FRAMES):
        return True
    return "libc" in leaf and any(frame in stack for frame in IDLE_WHEN_IN_LIBC)


def category(stack: str, leaf: str) -> str:
    for name, markers in CATEGORIES.items():
        if any(marker in stack for marker in markers):
            return name
    return "other: " + leaf[:60]


def read(paths: list[str]) -> tuple[collections.Counter, int, int]:
    """(busy samples per category, idle samples, all samples)."""
    busy, idle, total = collections.Counter(), 0, 0
    for path in paths:
        with open(path) as lines:
            for line in lines:
                stack, _, count = line.rstrip().rpartition(" ")
                if not stack:
                    continue
                samples, leaf = int(count), stack.split(";")[-1]
                total += samples
                if is_idle(stack, leaf):
                    idle += samples
                else:
                    busy[category(stack, leaf)] += samples
    return busy, idle, total


def main() -> None:
    busy, idle, total = read(sys.argv[1:])
    num_busy = total - idle
    print(f"samples {total}, idle {idle} ({100 * idle / max(total, 1):.0f}%), busy {num_busy}")
    for name, samples in busy.most_common(20):
        print(f"{100 * samples / max(num_busy, 1):5.1f}% of busy  {name}")


if __name__ == "__main__":
    main()
