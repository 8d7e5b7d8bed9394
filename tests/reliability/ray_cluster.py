"""Real multi-node Ray clusters on this one machine, for the Ray launcher's tests.

`NamespaceCluster`: a head and two workers, each `ray start` in its own network namespace with its own
address on a bridge (veth pairs), so Ray's and gRPC's traffic crosses interfaces as between machines.
Losing a node is SIGKILL to every process in its namespace, replicas included. Needs root and `ip`.

`OneHostCluster`: Ray's own multi-node cluster on one host (ray.cluster_utils.Cluster), every node on
this machine's address, for where namespaces cannot be made.

Both keep Ray small: no dashboard, 100 MB object stores, the head without CPUs (replicas go to the
workers), and node failures noticed within seconds (GCS health checks every 0.5 s, 3 misses).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 100 * 1024 * 1024
WORKER_CPUS = 2
SYSTEM_CONFIG = {} if os.environ.get("SCALELLM_TEST_RAY_DEFAULT_HEALTH") else {
    "health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
"""Ray's node health checks, faster than its defaults (SCALELLM_TEST_RAY_DEFAULT_HEALTH=1 keeps those)."""
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
START_TIMEOUT_S = 60.0


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.environ.get("SCALELLM_TEST_NO_NETNS"):
        return "SCALELLM_TEST_NO_NETNS is set"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"sllprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)


class NamespaceCluster:
    """Head + 2 workers in network namespaces on a bridge (see the module docstring)."""

    NAMES = ("head", "w1", "w2")

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.subnet = f"198.18.{tag % 250}"  # the range set aside for network tests (RFC 2544)
        self.bridge = f"sllbr{tag}"
        self.namespaces = {name: f"sll{tag}-{name}" for name in self.NAMES}
        self.ips = {name: f"{self.subnet}.{i + 1}" for i, name in enumerate(self.NAMES)}
        self.gateway_host = self.ips["head"]
        self.address = f"{self.ips['head']}:6379"
        self.worker_ips: list[str] | None = [self.ips["w1"], self.ips["w2"]]
        self.tmp = Path(tempfile.mkdtemp(prefix="sllray-"))
        self.nodes: dict[str, subprocess.Popen] = {}
        try:
            self._network()
            self._start_node("head")
            for name in ("w1", "w2"):
                self._start_node(name)
            self._wait_cpus(2 * WORKER_CPUS)
        except BaseException:
            self.close()
            raise

    def _network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, (name, ns) in enumerate(self.namespaces.items()):
            outer, inner = f"{self.bridge}v{index}", f"{self.bridge}p{index}"
            _ip("netns", "add", ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge, "up")
            _ip("addr", "add", f"{self.ips[name]}/24", "dev", inner, netns=ns)
            _ip("link", "set", inner, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)

    def _start_node(self, name: str) -> None:
        common = ["--block", "--node-ip-address", self.ips[name], "--object-store-memory", str(OBJECT_STORE_BYTES),
                  "--disable-usage-stats", "--include-log-monitor", "false"]
        if name == "head":
            role = ["--head", "--port", "6379", "--num-cpus", "0", "--include-dashboard", "false",
                    "--temp-dir", str(self.tmp / "ray"), "--system-config", json.dumps(SYSTEM_CONFIG)]
        else:
            role = ["--address", self.address, "--num-cpus", str(WORKER_CPUS)]
        log = open(self.tmp / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(
            self.exec_argv(name, str(VENV_BIN / "ray"), "start", *role, *common),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV}, start_new_session=True)
        self._wait_started(name)

    def _wait_started(self, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        path = self.tmp / f"{name}.log"
        while "Ray runtime started" not in path.read_text():
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{path.read_text()[-3000:]}")
            time.sleep(0.2)

    def _wait_cpus(self, cpus: int) -> None:
        """Until the GCS counts `cpus` CPUs: the workers registered."""
        deadline = time.monotonic() + START_TIMEOUT_S
        status = ""
        while f"/{cpus}.0 CPU" not in status:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not join:\n{status}")
            status = subprocess.run(self.exec_argv("head", str(VENV_BIN / "ray"), "status", "--address", self.address),
                                    capture_output=True, text=True, env={**os.environ, **RAY_ENV}).stdout

    def exec_argv(self, node: str, *argv: str) -> list[str]:
        """`argv` run in `node`'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def node_pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[node]], capture_output=True, text=True)
        return [int(pid) for pid in out.stdout.split()]

    def processes(self) -> list:
        """Every process on the cluster's nodes (psutil), whatever started it."""
        import psutil

        return [psutil.Process(pid) for node in self.NAMES for pid in self.node_pids(node) if psutil.pid_exists(pid)]

    def kill_worker(self, node: str) -> None:
        """The machine `node` is gone: every process in its namespace SIGKILLed at once."""
        for pid in self.node_pids(node):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[node].wait(10)

    def close(self) -> None:
        for node in reversed(self.NAMES):
            if node in self.namespaces:
                for pid in self.node_pids(node):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for process in self.nodes.values():
            process.wait(10)
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


class OneHostCluster:
    """Ray's multi-node cluster on one host: a head and two workers, all on this machine's address."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        os.environ.update(RAY_ENV, SCALELLM_TEST_CLUSTER=self.tag)  # inherited by every node and serve
        from ray.cluster_utils import Cluster

        node = {"object_store_memory": OBJECT_STORE_BYTES}
        self.cluster = Cluster(initialize_head=True, head_node_args={
            **node, "num_cpus": 0, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
        self.workers = {name: self.cluster.add_node(num_cpus=WORKER_CPUS, **node) for name in ("w1", "w2")}
        self.cluster.wait_for_nodes()
        self.address = self.cluster.address
        self.gateway_host = "127.0.0.1"
        self.worker_ips = None  # every node has the same address: replicas are told apart by no address

    def exec_argv(self, node: str, *argv: str) -> list[str]:
        return list(argv)

    def processes(self) -> list:
        """Every process started by this cluster or by serve against it (they carry its tag)."""
        import psutil

        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and process.environ().get("SCALELLM_TEST_CLUSTER") == self.tag:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def kill_worker(self, node: str) -> None:
        self.cluster.remove_node(self.workers[node], allow_graceful=False)

    def close(self) -> None:
        self.cluster.shutdown()
        os.environ.pop("SCALELLM_TEST_CLUSTER", None)
