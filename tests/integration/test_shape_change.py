"""`scalellm serve --shape auto` changing shape under live load (mock replicas): no request fails.

A tiny profile makes 2x1 twice as good as 1x2 from 4 requests in flight and 1x2 better alone, and
short controller settings make the change happen within seconds: 8 clients (half streamed) push the
deployment from 1x2 to 2x1, then one client brings it back to 1x2.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest

from scalellm.bench.client import ClientConfig, build_body
from scalellm.bench.datasets import random_requests
from scalellm.bench.steps import LoadStep, run_steps, summarize_steps
from scalellm.process import free_ports
from scalellm.rpc.client import ReplicaClient
from tests.integration.test_serve_mock import stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

MAX_TOKENS = 12
EXPECTED = " ".join(f"tok{i}" for i in range(MAX_TOKENS))


def tiny_profile() -> dict:
    def point(concurrency: int, tokens_per_s: float) -> dict:
        return {"concurrency": concurrency, "output_throughput": tokens_per_s, "request_throughput": 1.0,
                "ttft_p50_ms": 1, "ttft_p99_ms": 1, "tpot_p50_ms": 1, "tpot_p99_ms": 1, "e2e_p50_ms": 1,
                "e2e_p99_ms": 1}

    return {"version": 1, "model": "mock", "device": "cpu", "num_units": 2, "workload": "synthetic",
            "shapes": [{"shape": "1x2", "points": [point(1, 100), point(4, 120)]},
                       {"shape": "2x1", "points": [point(1, 60), point(4, 240)]}]}


@pytest.fixture(scope="module")
def auto_serve(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shape")
    profile = folder / "profile.json"
    profile.write_text(json.dumps(tiny_profile()))
    log_path = folder / "serve.log"
    port = free_ports(1)[0]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "scalellm.cli", "serve", "--engine", "mock", "--tpot-ms", "10", "--port", str(port),
             "--shape", "auto", "--profile", str(profile), "--shape-sustain", "1", "--shape-dwell", "3",
             "--shape-smoothing", "0.5", "--shape-poll", "0.25", "--health-interval", "0.5", "--no-request-log"],
            stdout=subprocess.PIPE, stderr=log, text=True)
    banner = process.stdout.readline()
    if "ScaleLLM serving" not in banner:
        process.kill()
        raise AssertionError(f"serve did not start: {banner!r}\n{log_path.read_text()}")
    yield process, port, banner, log_path
    stop(process)


def live_replicas(process: subprocess.Popen) -> dict[str, psutil.Process]:
    """Replica children by the port they listen on (a replica still starting has none yet)."""
    found = {}
    for child in psutil.Process(process.pid).children():
        try:
            if "replica" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                ports = [str(c.laddr.port) for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
                if ports:
                    found[ports[0]] = child
        except psutil.NoSuchProcess:
            pass
    return found


def shape_metrics(port: int) -> tuple[str | None, float]:
    """(current shape as RxP, scalellm:shape_changes_total) from /metrics."""
    text = openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="x").get("/metrics", cast_to=str)
    current = re.search(r'^scalellm:shape_info\{parallel="(\d+)",replicas="(\d+)"\} 1\.0$', text, re.MULTILINE)
    changes = re.search(r"^scalellm:shape_changes_total (\S+)$", text, re.MULTILINE)
    return (f"{current.group(2)}x{current.group(1)}" if current else None), float(changes.group(1))


class ClientLoad:
    """`num_clients` threads sending chat requests with the openai client (even ones streamed) until stopped."""

    def __init__(self, port: int, num_clients: int) -> None:
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        self.ok, self.failures = 0, []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(k % 2 == 0,)) for k in range(num_clients)]

    def __enter__(self) -> "ClientLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _work(self, stream: bool) -> None:
        while not self._stop.is_set():
            try:
                text = self._one(stream)
                assert text == EXPECTED, text
                with self._lock:
                    self.ok += 1
            except Exception as error:  # every failure is recorded; the test asserts there are none
                with self._lock:
                    self.failures.append(repr(error))

    def _one(self, stream: bool) -> str:
        messages = [{"role": "user", "content": "hello"}]
        if not stream:
            response = self.client.chat.completions.create(model="mock", messages=messages, max_tokens=MAX_TOKENS)
            return response.choices[0].message.content
        chunks = self.client.chat.completions.create(model="mock", messages=messages, max_tokens=MAX_TOKENS,
                                                     stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def wait_for_shape(port: int, shape: str, changes: int, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while shape_metrics(port) != (shape, changes):
        assert time.monotonic() < deadline, f"still {shape_metrics(port)}, expected {(shape, changes)}"
        time.sleep(0.2)


async def requests_received(addresses) -> list[int]:
    counts = []
    for address in addresses:
        client = ReplicaClient(address)
        counts.append((await client.load()).num_requests_received)
        await client.close()
    return counts


def test_shape_changes_under_load_without_a_failed_request(auto_serve):
    process, port, banner, log_path = auto_serve
    assert banner.strip().endswith("(1 replica, shape auto, now 1x2; fake model, no weights)")
    assert shape_metrics(port) == ("1x2", 0)
    first_set = live_replicas(process)
    assert len(first_set) == 1
    with ClientLoad(port, num_clients=8) as heavy:
        wait_for_shape(port, "2x1", 1)
        time.sleep(1.5)
    for replica in first_set.values():
        replica.wait(20)  # the old replica was stopped once drained
    second_set = live_replicas(process)
    assert len(second_set) == 2 and not set(second_set) & set(first_set)
    assert min(asyncio.run(requests_received([f"127.0.0.1:{p}" for p in second_set]))) > 0
    with ClientLoad(port, num_clients=1) as light:
        wait_for_shape(port, "1x2", 2)
        time.sleep(1.0)
    for replica in second_set.values():
        replica.wait(20)
    assert heavy.failures == [] and light.failures == []
    assert heavy.ok > 20 and light.ok > 5
    deadline = time.monotonic() + 10
    while "2x1 stopped" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # logged once the stopped processes are reaped
    log = log_path.read_text()
    assert re.search(r"shape change 1x2 -> 2x1: smoothed load [\d.]+ requests in flight .*"
                     r"profile predicts 2x1 \d+ output tok/s vs 1x2 \d+", log), log
    assert "shape change 2x1 -> 1x2" in log and "1x2 stopped" in log and "2x1 stopped" in log


def test_stepped_bench_load_samples_the_shape(auto_serve):
    _, port, _, _ = auto_serve
    client = ClientConfig(base_url=f"http://127.0.0.1:{port}", model="mock")
    steps = (LoadStep(1, 1.0), LoadStep(3, 1.5))

    def make_body(n: int) -> bytes:
        return build_body(random_requests(1, 4, 6, seed=n)[0], client)

    run = asyncio.run(run_steps(client, steps, make_body, warmup_bodies=[make_body(-1)]))
    rows = summarize_steps(run, steps)
    assert [row["summary"]["failed"] for row in rows] == [0, 0]
    assert all(row["summary"]["completed"] > 3 for row in rows)
    assert max(row["summary"]["max_concurrent_requests"] for row in rows) == 3
    assert run.shapes and run.shapes[0][1] in ("1x2", "2x1")
