"""Priorities and fair shares, measured on `scalellm serve --engine mock` (the real scheduler and gateway).

    python benchmarks/safety/priority.py [--tpot-ms 20] [--max-num-seqs 8] [--seconds 20] [--out DIR]

1. TTFT of a high-priority key (priority=0), sequential requests: alone, then while a low-priority key
   (priority=10) keeps 6x the batch size of streams in flight (and, for contrast, some sent with the
   load's own priority). Target: loaded p99 within 2x unloaded.
2. Tokens per second of two keys of equal weight under saturation, one with 3x the other's streams in
   flight: with --max-concurrent (fair share) and without it (first come first served at the replica).
   Target: equal within 10% with fair share.
Prints a markdown table and writes results.json under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

KEYS = "key-high priority=0\nkey-low priority=10\nkey-a weight=1 priority=5\nkey-b weight=1 priority=5\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, key_file: str, fair: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "scalellm.cli", "serve", "--engine", "mock", "--replicas", "1",
               "--tpot-ms", str(args.tpot_ms), "--max-num-seqs", str(args.max_num_seqs), "--port", str(port),
               "--api-key-file", key_file, "--no-request-log", "--drain-timeout", "1"]
    if fair:
        command += ["--max-concurrent", str(args.max_num_seqs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "serving" in line.lower() and str(port) in line:
            break
    else:
        raise RuntimeError("serve exited before it was ready")
    return process, f"http://127.0.0.1:{port}"


async def stream_once(session, url: str, key: str, max_tokens: int, on_tokens=None, priority=None) -> float:
    """One streamed completion; returns its TTFT in seconds (first text), calls on_tokens(n, t) per chunk."""
    body = {"prompt": "measure this", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    if priority is not None:
        body["priority"] = priority
    start, ttft = time.perf_counter(), None
    async with session.post(url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            text = json.loads(line[6:])["choices"][0]["text"] if b'"choices":[{' in line else ""
            if text:
                now = time.perf_counter()
                ttft = ttft if ttft is not None else now - start
                if on_tokens is not None:
                    on_tokens(len(text.split()), now)
    return ttft


async def keep_busy(session, url: str, key: str, concurrency: int, max_tokens: int, stop: asyncio.Event,
                    on_tokens=None) -> None:
    async def worker():
        while not stop.is_set():
            await stream_once(session, url, key, max_tokens, on_tokens)
    await asyncio.gather(*(worker() for _ in range(concurrency)))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def high_priority_ttfts(session, url: str, count: int, priority=None) -> list[float]:
    ttfts = []
    for _ in range(count):
        ttfts.append(await stream_once(session, url, "key-high", 16, priority=priority))
        await asyncio.sleep(0.05)
    return ttfts


async def priority_phase(args, url: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await high_priority_ttfts(session, url, 5)  # warm up
        unloaded = await high_priority_ttfts(session, url, args.samples)
        stop = asyncio.Event()
        load = asyncio.create_task(keep_busy(session, url, "key-low", 6 * args.max_num_seqs, 64, stop))
        await asyncio.sleep(2.0)
        loaded = await high_priority_ttfts(session, url, args.samples)
        same = await high_priority_ttfts(session, url, max(10, args.samples // 4), priority=10)
        stop.set()
        await load
    return {name: {"p50_ms": 1000 * percentile(v, 50), "p99_ms": 1000 * percentile(v, 99), "n": len(v)}
            for name, v in (("unloaded", unloaded), ("loaded", loaded), ("loaded_same_priority", same))}


async def fairness_phase(args, url: str) -> dict:
    counts = {"key-a": 0, "key-b": 0}
    window = [0.0, 0.0]

    def counter(key):
        def on_tokens(num_tokens, now):
            if window[0] <= now <= window[1]:
                counts[key] += num_tokens
        return on_tokens
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        stop = asyncio.Event()
        window[:] = [time.perf_counter() + 3.0, time.perf_counter() + 3.0 + args.seconds]
        load = [asyncio.create_task(keep_busy(session, url, "key-a", args.max_num_seqs, 32, stop, counter("key-a"))),
                asyncio.create_task(keep_busy(session, url, "key-b", 3 * args.max_num_seqs, 32, stop,
                                              counter("key-b")))]
        await asyncio.sleep(3.0 + args.seconds)
        stop.set()
        await asyncio.gather(*load)
    rates = {key: count / args.seconds for key, count in counts.items()}
    return {"tokens_per_s": rates, "b_over_a": rates["key-b"] / rates["key-a"] if rates["key-a"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpot-ms", type=float, default=20.0)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--samples", type=int, default=200, help="high-priority requests per TTFT measurement")
    parser.add_argument("--seconds", type=float, default=20.0, help="fairness measurement window")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/safety/results"))
    args = parser.parse_args()
    results = {"config": vars(args) | {"out": str(args.out)}}
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as keys:
        keys.write(KEYS)
    for fair in (True, False):
        process, url = start_server(args, keys.name, fair)
        try:
            name = "fair_share" if fair else "fcfs"
            if fair:
                results["priority"] = asyncio.run(priority_phase(args, url))
            results[name] = asyncio.run(fairness_phase(args, url))
        finally:
            process.terminate()
            process.wait(30)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    p = results["priority"]
    print("| measurement | value |\n|---|---|")
    print(f"| high-priority TTFT p50 / p99, unloaded | {p['unloaded']['p50_ms']:.1f} / "
          f"{p['unloaded']['p99_ms']:.1f} ms |")
    print(f"| high-priority TTFT p50 / p99, low-priority load | {p['loaded']['p50_ms']:.1f} / "
          f"{p['loaded']['p99_ms']:.1f} ms ({p['loaded']['p99_ms'] / p['unloaded']['p99_ms']:.2f}x) |")
    same = p["loaded_same_priority"]
    print(f"| the same requests sent with the load's priority (10) | {same['p50_ms']:.1f} / {same['p99_ms']:.1f} ms |")
    for name in ("fair_share", "fcfs"):
        rates = results[name]["tokens_per_s"]
        print(f"| {name}: key-a (1x streams) / key-b (3x streams) tokens/s | {rates['key-a']:.0f} / "
              f"{rates['key-b']:.0f} (b/a {results[name]['b_over_a']:.2f}) |")


if __name__ == "__main__":
    main()
