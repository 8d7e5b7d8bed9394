"""The soak test: `scalellm serve` under a long closed-loop load, then a check that nothing was lost.

    python -m scalellm.bench.stress                      # 10 minutes, C=128, default model, int8, 2 replicas
    python -m scalellm.bench.stress --duration 60 --engine mock

It starts its own `scalellm serve`, keeps `concurrency` requests in flight (streamed and non-streamed,
chat and completions, in turn) until `duration_s` has passed or `max_requests` were sent, whichever
comes first, and samples the resident memory of the gateway and of each replica all along. After the
load it reads every replica's KV blocks in use over its Load RPC. Results go to OUT/stress.json,
OUT/stress.md and OUT/stress_rss.png (report in stress_report.py). Exit code 1 when a request failed,
a KV block or a request stayed behind, or resident memory grew over the second half of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

from scalellm.bench.client import ClientConfig, build_body, make_session, send_request
from scalellm.bench.datasets import WORDS, RequestSpec
from scalellm.process import free_ports


@dataclass(frozen=True)
class StressConfig:
    """One soak run."""

    duration_s: float = 600.0
    """Stop sending after this many seconds (requests in flight then finish)."""
    max_requests: int = 1_000_000
    """Stop sending after this many requests."""
    concurrency: int = 128
    """Requests in flight at every moment."""
    replicas: int = 2
    engine: str = "real"
    """real (the default model) or mock."""
    quantization: str = "int8"
    min_tokens: int = 16
    max_tokens: int = 64
    """Each request asks for a seeded random number of tokens in [min_tokens, max_tokens] (ignore_eos)."""
    sample_interval_s: float = 5.0
    """How often resident memory and replica load are sampled."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.max_requests < 1 or self.concurrency < 1 or self.replicas < 1:
            raise ValueError("duration, max requests, concurrency and replicas must be positive")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError("need 1 <= min_tokens <= max_tokens")
        if self.engine not in ("real", "mock"):
            raise ValueError(f"engine must be real or mock, got {self.engine!r}")


@dataclass
class Tally:
    """What happened to the requests, by kind."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    output_tokens: int = 0
    by_kind: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)

    def add(self, kind: str, result) -> None:
        counts = self.by_kind.setdefault(kind, {"sent": 0, "failed": 0})
        counts["sent"] += 1
        self.sent += 1
        if result.success:
            self.succeeded += 1
            self.output_tokens += result.output_tokens
        else:
            counts["failed"] += 1
            self.failed += 1
            if len(self.errors) < 20:
                self.errors.append(f"{kind}: {result.error}")


class ServeProcess:
    """`scalellm serve` in a subprocess, with the pids of its gateway and replicas."""

    def __init__(self, config: StressConfig) -> None:
        self.port = free_ports(1)[0]
        argv = [sys.executable, "-m", "scalellm.cli", "serve", "--replicas", str(config.replicas),
                "--port", str(self.port), "--no-request-log", "--max-queue", str(4 * config.concurrency)]
        argv += ["--engine", "mock", "--tpot-ms", "20"] if config.engine == "mock" else \
            ["--quantization", config.quantization]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        banner = self.process.stdout.readline()
        if "ScaleLLM serving" not in banner:
            self.process.kill()
            raise RuntimeError(f"scalellm serve did not start (exit code {self.process.wait()})")
        self.model = banner.split("serving ", 1)[1].split(" at ", 1)[0]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def children(self) -> dict[str, psutil.Process]:
        """name -> process: "gateway" and "replica HOST:PORT" for each live child."""
        found = {}
        for child in psutil.Process(self.process.pid).children():
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "gateway" in cmdline:
                found["gateway"] = child
            elif "replica" in cmdline:
                found[f"replica 127.0.0.1:{cmdline[cmdline.index('--port') + 1]}"] = child
        return found

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def request_plan(model: str, base_url: str) -> list[tuple[str, ClientConfig]]:
    """The four kinds of request, sent in turn: (kind, client config)."""
    plan = []
    for endpoint in ("chat", "completions"):
        for stream in (True, False):
            kind = f"{endpoint}/{'stream' if stream else 'whole'}"
            plan.append((kind, ClientConfig(base_url, model, endpoint=endpoint, stream=stream,
                                            temperature=1.0, timeout_s=600.0)))
    return plan


def request_body(index: int, client: ClientConfig, rng: random.Random, config: StressConfig) -> bytes:
    """A seeded prompt of 8-48 random words and a seeded max_tokens."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 48)))
    prompt = f"Request {index}. Write a few sentences using these words: {words}"
    max_tokens = rng.randint(config.min_tokens, config.max_tokens)
    return build_body(RequestSpec(prompt=prompt, max_tokens=max_tokens), client)


async def run_load(config: StressConfig, serve: ServeProcess, tally: Tally) -> float:
    """Closed loop until the time or count bound; returns the seconds the load ran."""
    plan = request_plan(serve.model, serve.base_url)
    rng = random.Random(config.seed)
    deadline = time.monotonic() + config.duration_s
    counter = iter(range(config.max_requests))
    start = time.monotonic()

    async def worker(session) -> None:
        for index in counter:
            if time.monotonic() >= deadline:
                return
            kind, client = plan[index % len(plan)]
            result = await send_request(session, client, request_body(index, client, rng, config))
            tally.add(kind, result)

    async with make_session(plan[0][1], config.concurrency) as session:
        await asyncio.gather(*(worker(session) for _ in range(config.concurrency)))
    return time.monotonic() - start


async def replica_loads(addresses: list[str]) -> dict[str, dict]:
    """Each replica's Load: blocks in use, running and waiting requests."""
    from scalellm.rpc.client import ReplicaClient

    loads = {}
    for address in addresses:
        client = ReplicaClient(address)
        try:
            load = await client.load(timeout_s=5.0)
            loads[address] = {"kv_blocks_in_use": load.num_total_blocks - load.num_free_blocks,
                              "kv_blocks_total": load.num_total_blocks, "running": load.num_running,
                              "waiting": load.num_waiting}
        finally:
            await client.close()
    return loads


async def sample_forever(serve: ServeProcess, samples: list[dict], interval_s: float, start: float) -> None:
    """Append {"t": seconds, "rss_mib": {name: MiB}, "kv_blocks_in_use": {...}} every interval."""
    while True:
        entry = {"t": round(time.monotonic() - start, 1), "rss_mib": {}}
        for name, process in serve.children().items():
            try:
                entry["rss_mib"][name] = round(process.memory_info().rss / 2**20, 1)
            except psutil.Error:
                pass
        addresses = [name.split(" ", 1)[1] for name in entry["rss_mib"] if name.startswith("replica")]
        try:
            entry["kv_blocks_in_use"] = {a: v["kv_blocks_in_use"] for a, v in (await replica_loads(addresses)).items()}
        except Exception as error:  # a sample that could not be taken is data, not a crash
            entry["error"] = str(error)[:200]
        samples.append(entry)
        await asyncio.sleep(interval_s)


async def soak(config: StressConfig) -> dict:
    """Run the whole soak and return the result dictionary (see stress_report.py)."""
    serve = ServeProcess(config)
    tally, samples = Tally(), []
    try:
        start = time.monotonic()
        sampler = asyncio.create_task(sample_forever(serve, samples, config.sample_interval_s, start))
        load_s = await run_load(config, serve, tally)
        await asyncio.sleep(max(2.0, config.sample_interval_s))  # let the replicas finish any clean-up
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        addresses = [name.split(" ", 1)[1] for name in serve.children() if name.startswith("replica")]
        after = await replica_loads(addresses)
    finally:
        exit_code = serve.stop()
    return {"config": asdict(config), "model": serve.model, "load_seconds": round(load_s, 1),
            "requests": asdict(tally), "after_load": after, "samples": samples, "serve_exit_code": exit_code}


def parse_args(argv: list[str] | None = None) -> tuple[StressConfig, str]:
    defaults = StressConfig()
    parser = argparse.ArgumentParser(prog="python -m scalellm.bench.stress", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=defaults.duration_s, help="seconds of load (%(default)s)")
    parser.add_argument("--max-requests", type=int, default=defaults.max_requests, help="request cap (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="in flight (%(default)s)")
    parser.add_argument("--replicas", type=int, default=defaults.replicas, help="replicas (%(default)s)")
    parser.add_argument("--engine", choices=("real", "mock"), default=defaults.engine)
    parser.add_argument("--quantization", choices=("auto", "none", "int8", "gguf"), default=defaults.quantization)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--sample-interval", type=float, default=defaults.sample_interval_s)
    parser.add_argument("--out", default="benchmarks/stress", help="output directory (%(default)s)")
    args = parser.parse_args(argv)
    config = StressConfig(duration_s=args.duration, max_requests=args.max_requests, concurrency=args.concurrency,
                          replicas=args.replicas, engine=args.engine, quantization=args.quantization,
                          max_tokens=args.max_tokens, min_tokens=min(defaults.min_tokens, args.max_tokens),
                          sample_interval_s=args.sample_interval)
    return config, args.out


def main(argv: list[str] | None = None) -> int:
    from scalellm.bench.stress_report import judge, write_report

    config, out = parse_args(argv)
    print(f"soak: {config.duration_s:g} s or {config.max_requests} requests at C={config.concurrency}, "
          f"{config.replicas} replicas ({config.engine})", flush=True)
    result = asyncio.run(soak(config))
    result["verdict"] = judge(result)
    paths = write_report(result, out)
    print(open(paths[1]).read(), flush=True)
    return 0 if result["verdict"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
