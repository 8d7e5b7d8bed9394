"""`scalellm serve --launcher ray` on a real multi-node Ray cluster started here (tests/reliability/ray_cluster.py).

A head and two workers, each in its own network namespace on a bridge (or, where namespaces cannot be
made, Ray's one-host multi-node cluster); mock-engine replicas of one thread each. The gateway runs on
the head, as `serve` does; the tests reach it, and try to reach the replicas, from another namespace.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from ray_cluster import NamespaceCluster, OneHostCluster, namespaces_unavailable  # noqa: E402

from scalellm.process import free_ports  # noqa: E402
from scalellm.rpc.client import ReplicaClient, ReplicaError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TPOT_MS = 20
RECOVERY_TIMEOUT_S = 60.0


@pytest.fixture(scope="module", params=["namespaces", "one_host"])
def cluster(request):
    reason = namespaces_unavailable()
    if request.param == "namespaces":
        if reason is not None:
            pytest.skip(f"no network namespaces ({reason}); the one-host cluster runs these tests")
        made = NamespaceCluster()
    else:
        if reason is None:
            pytest.skip("network namespaces are available: the namespaced cluster ran these tests")
        made = OneHostCluster()
    yield made
    made.close()


class RayServe:
    """`scalellm serve --launcher ray` on the head node; its output lines collected as they come."""

    def __init__(self, cluster, *args: str) -> None:
        self.port = 8000 if cluster.worker_ips else free_ports(1)[0]
        self.url = f"http://{cluster.gateway_host}:{self.port}/v1"
        argv = [sys.executable, "-m", "scalellm.cli", "serve", "--launcher", "ray", "--ray-address", cluster.address,
                "--host", cluster.gateway_host, "--port", str(self.port), "--engine", "mock", "--tpot-ms",
                str(TPOT_MS), "--no-request-log", "--drain-timeout", "1", *args]
        self.process = subprocess.Popen(cluster.exec_argv("head", *argv), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float, start: int = 0) -> int:
        """Index of the first output line from `start` on matching `pattern`; AssertionError on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index in range(start, len(self.lines)):
                if re.search(pattern, self.lines[index]):
                    return index
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; serve said:\n" + "\n".join(self.lines[-40:]))

    def addresses(self) -> list[str]:
        """The replica addresses the gateway was last told of."""
        found: list[str] = []
        for line in self.lines:
            if match := re.search(r"gateway listening on \S+, replicas: (.+)$", line):
                found = match.group(1).split(", ")
            elif match := re.search(r"replica set now \S+: (.+?)(?: \(.*\))?$", line):
                found = match.group(1).split(", ")
        return found

    def client(self):
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=30.0)

    def stop(self, signum: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def serve(cluster):
    served = RayServe(cluster, "--replicas", "2")
    try:
        served.wait_for("ScaleLLM serving", 120.0)
        yield served
    finally:
        if served.process.poll() is None:
            served.stop()


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def test_too_few_free_cpus_is_refused_naming_what_to_do(cluster):
    refused = RayServe(cluster, "--replicas", "5")
    assert refused.process.wait(60) == 2
    refused._reader.join(5)
    assert any("cannot place 5 replicas" in line and "add nodes" in line for line in refused.lines), refused.lines


def test_a_shape_change_on_ray_drops_no_request(cluster, tmp_path):
    """--shape auto on the cluster's 4 worker CPUs cuts shapes from 2 (the rest is the change's headroom):
    a profile that makes 2x1 better from 4 requests in flight moves 1x2 to 2x1 under load."""
    from tests.integration.test_shape_change import tiny_profile

    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(tiny_profile()))
    auto = RayServe(cluster, "--shape", "auto", "--profile", str(profile), "--shape-sustain", "1", "--shape-dwell",
                    "3", "--shape-smoothing", "0.5", "--shape-poll", "0.25", "--health-interval", "0.5")
    try:
        auto.wait_for("ScaleLLM serving", 120.0)
        assert len(auto.addresses()) == 1
        load = Load(auto.client(), unary_threads=4, stream_threads=4)
        try:
            auto.wait_for(r"shape 2x1 serving; 1x2 stopped", 60.0)
        finally:
            load.finish()
        assert load.unary_failed == [] and load.streams_broken == [] and load.stream_errors == []
        assert load.unary_ok > 0 and load.streams_complete > 0
        assert len(auto.addresses()) == 2
    finally:
        assert auto.stop() == 0


def test_replicas_spread_over_both_workers_serve_through_the_openai_client(cluster, serve):
    addresses = serve.addresses()
    assert len(addresses) == 2, serve.lines[-20:]
    if cluster.worker_ips is not None:  # one replica on each worker, on the worker's own address
        assert sorted(_host(a) for a in addresses) == sorted(cluster.worker_ips)
    client = serve.client()
    replies = [client.completions.create(model="mock", prompt="one two three", max_tokens=5) for _ in range(4)]
    assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5 for r in replies)
    chat = client.chat.completions.create(model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content and chat.usage.completion_tokens == 4


def test_a_replica_called_without_the_secret_refuses(serve):
    async def call(address):
        client = ReplicaClient(address)
        try:
            return await client.health()
        finally:
            await client.close()

    for address in serve.addresses():
        with pytest.raises(ReplicaError) as refused:
            asyncio.run(call(address))
        assert refused.value.status_code == 502 and "secret" in refused.value.message


class Load:
    """Non-streamed and streamed completions in a loop on threads, every outcome counted."""

    def __init__(self, client, unary_threads: int = 3, stream_threads: int = 2) -> None:
        self.client = client
        self.stop = threading.Event()
        self.unary_ok, self.unary_failed = 0, []
        self.streams_complete, self.stream_errors, self.streams_broken = 0, [], []
        self.threads = [threading.Thread(target=self._unary) for _ in range(unary_threads)]
        self.threads += [threading.Thread(target=self._streams) for _ in range(stream_threads)]
        for thread in self.threads:
            thread.start()

    def _unary(self) -> None:
        while not self.stop.is_set():
            try:
                reply = self.client.completions.create(model="mock", prompt="a b c", max_tokens=10)
                assert reply.usage.completion_tokens == 10
                self.unary_ok += 1
            except Exception as error:  # noqa: BLE001 - every failure is what the test counts
                self.unary_failed.append(repr(error))

    def _streams(self) -> None:
        while not self.stop.is_set():
            finish = None
            try:
                for chunk in self.client.completions.create(model="mock", prompt="a b c", max_tokens=50, stream=True):
                    finish = chunk.choices[0].finish_reason if chunk.choices else finish
            except openai.APIError as error:  # the gateway's error event, or a 5xx before the stream began
                self.stream_errors.append(repr(error))
                continue
            except Exception as error:  # noqa: BLE001
                self.streams_broken.append(repr(error))
                continue
            if finish == "length":
                self.streams_complete += 1
            else:
                self.streams_broken.append(f"ended without finishing: {finish}")

    def finish(self, timeout_s: float = 40.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self.threads), "a request hung"


def test_a_worker_lost_under_load_fails_no_unary_request_and_its_replica_returns_elsewhere(cluster, serve):
    before = serve.addresses()
    lost, kept = ("w1", "w2")
    if cluster.worker_ips is not None:
        lost_ip = cluster.worker_ips[0]
        assert lost_ip in {_host(a) for a in before}
    load = Load(serve.client())
    try:
        time.sleep(2.0)
        mark = len(serve.lines)
        killed_at = time.monotonic()
        cluster.kill_worker(lost)
        serve.wait_for(r"was lost|exited with code", RECOVERY_TIMEOUT_S, mark)
        noticed_s = time.monotonic() - killed_at
        serve.wait_for(r"restarted at", RECOVERY_TIMEOUT_S, mark)
        replaced_s = time.monotonic() - killed_at
        time.sleep(2.0)  # load on the replaced set
    finally:
        load.finish()
    after = serve.addresses()
    print(f"node lost: noticed after {noticed_s:.1f} s, replica replaced after {replaced_s:.1f} s; "
          f"unary ok {load.unary_ok} failed {len(load.unary_failed)}; streams complete {load.streams_complete}, "
          f"error events {len(load.stream_errors)}, broken {len(load.streams_broken)}")
    assert load.unary_failed == [] and load.unary_ok > 0
    assert load.streams_broken == [] and load.streams_complete > 0
    assert len(after) == 2 and after != before
    if cluster.worker_ips is not None:  # both replicas now on the worker that remains
        assert {_host(a) for a in after} == {cluster.worker_ips[1]}
    reply = serve.client().completions.create(model="mock", prompt="x", max_tokens=3)
    assert reply.usage.completion_tokens == 3


def _leftovers(cluster) -> list[str]:
    """Replica processes and replica actors still running anywhere on this machine."""
    import psutil

    found = []
    for process in cluster.processes():
        try:
            line = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "ReplicaHost" in line or "scalellm.cli replica" in line or "scalellm.supervisor gateway" in line:
            found.append(f"{process.pid} {line[:80]}")
    return found


def test_serve_killed_leaves_no_actor_or_process_behind(cluster, serve):
    assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
    deadline = time.monotonic() + 30.0
    while _leftovers(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _leftovers(cluster) == []
