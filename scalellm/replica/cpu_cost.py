"""Measures the CPU a replica spends per streamed token, with the mock engine (no model).

    python -m scalellm.replica.cpu_cost [--concurrency 32] [--max-tokens 256] [--rounds 3] [--tpot-ms 5]

Starts `scalellm replica --engine mock` as a subprocess, streams `concurrency` requests at a time
through `ReplicaClient`, and reports CPU seconds (user + system, from /proc) per output token: of the
replica process (gRPC server + mock engine), of the mock engine alone (the same load in-process,
without gRPC), and of the client side (what the gateway pays to receive a token).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time

import uvloop

from scalellm.protocol.types import SamplingParams
from scalellm.replica.mock_engine import MockEngine
from scalellm.rpc.client import ReplicaClient, ReplicaError


def _process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(generate, concurrency: int, max_tokens: int, rounds: int) -> int:
    """Run `rounds` waves of `concurrency` requests; returns the output tokens received."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def one(request_id: str) -> int:
        return sum([len(c.token_ids) async for output in generate(request_id, "measure the replica", params)
                    for c in output.outputs])
    total = 0
    for wave in range(rounds):
        counts = await asyncio.gather(*(one(f"w{wave}-r{i}") for i in range(concurrency)))
        total += sum(counts)
    return total


async def _measure_replica(address: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    client = ReplicaClient(address)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if (await client.health()).healthy:
                    break
            except ReplicaError:
                assert time.monotonic() < deadline, "the replica did not start"
                await asyncio.sleep(0.1)
        await _drive(lambda r, p, s: client.generate(r, p, s, time.time()), args.concurrency, 8, 1)  # warm-up
        replica_before, client_before = _process_cpu_s(pid), time.process_time()
        start = time.perf_counter()
        tokens = await _drive(lambda r, p, s: client.generate(r, p, s, time.time()),
                              args.concurrency, args.max_tokens, args.rounds)
        elapsed = time.perf_counter() - start
        return {"tokens": tokens, "seconds": elapsed,
                "replica_us_per_token": (_process_cpu_s(pid) - replica_before) / tokens * 1e6,
                "client_us_per_token": (time.process_time() - client_before) / tokens * 1e6}
    finally:
        await client.close()


async def _measure_engine_alone(args: argparse.Namespace) -> float:
    engine = MockEngine(tpot_ms=args.tpot_ms)
    await engine.start()
    try:
        before = time.process_time()
        tokens = await _drive(engine.generate, args.concurrency, args.max_tokens, args.rounds)
        return (time.process_time() - before) / tokens * 1e6
    finally:
        await engine.shutdown()


def main() -> None:
    """Entry point: print the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tpot-ms", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=50151)
    args = parser.parse_args()
    replica = subprocess.Popen([sys.executable, "-m", "scalellm.cli", "replica", "--engine", "mock",
                                "--tpot-ms", str(args.tpot_ms), "--max-num-seqs", str(args.concurrency),
                                "--port", str(args.port)], stderr=subprocess.DEVNULL)
    try:
        result = uvloop.run(_measure_replica(f"127.0.0.1:{args.port}", replica.pid, args))
    finally:
        replica.terminate()
        replica.wait()
    engine_us = uvloop.run(_measure_engine_alone(args))
    print(f"{result['tokens']} tokens in {result['seconds']:.2f} s "
          f"({result['tokens'] / result['seconds']:.0f} tokens/s), concurrency {args.concurrency}, "
          f"tpot {args.tpot_ms} ms")
    print(f"replica process (gRPC + mock engine): {result['replica_us_per_token']:.1f} us CPU per token")
    print(f"mock engine alone:                     {engine_us:.1f} us CPU per token")
    print(f"client side (ReplicaClient):           {result['client_us_per_token']:.1f} us CPU per token")


if __name__ == "__main__":
    main()
