"""Supervisor and child-process pieces without a server: restart backoff, forced stop, ports, threads, CLI flags."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import pytest

from scalellm.deploy.local import LocalLauncher, default_replica_count, threads_per_replica
from scalellm.gateway.config import GatewayConfig
from scalellm.process import ChildProcess, free_ports
from scalellm.replica.launch import add_replica_args, engine_argv
from scalellm.shape.shape import Machine, Shape
from scalellm.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def test_dead_child_restarts_at_once_then_with_backoff():
    child = ChildProcess("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    child.start()
    child.process.wait(10)
    now = time.monotonic()
    child.check_restart(now)
    assert child.num_failures == 1 and child.restart_at is None  # restarted without delay
    child.process.wait(10)
    child.check_restart(now)
    assert child.restart_at == pytest.approx(now + 1.0)
    first = child.process
    child.check_restart(now + 0.5)
    assert child.process is first
    child.check_restart(now + 1.0)
    assert child.process is not first
    child.process.wait(10)
    child.check_restart(now + 1.0)
    assert child.restart_at == pytest.approx(now + 3.0)  # 2 s backoff for the third failure
    child.stop(1.0)


def test_stop_kills_a_child_that_ignores_sigterm():
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
    child = ChildProcess("stubborn", [sys.executable, "-c", code])
    child.process = subprocess.Popen(child.argv, stdout=subprocess.PIPE, start_new_session=True)
    child.process.stdout.readline()
    started = time.monotonic()
    child.stop(0.5)
    assert child.poll() is not None and time.monotonic() - started < 5


def test_child_gets_stdin_data():
    child = ChildProcess("echo", [sys.executable, "-c", "import sys; sys.exit(len(sys.stdin.read()))"], b"abc")
    child.start()
    assert child.process.wait(10) == 3


def test_free_ports_are_distinct():
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(p > 0 for p in ports)


@pytest.mark.parametrize("replicas, cores, expected", [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8)])
def test_threads_per_replica(replicas, cores, expected):
    assert threads_per_replica(replicas, cores) == expected


def test_engine_argv_round_trips_through_the_replica_parser():
    parser = argparse.ArgumentParser()
    add_replica_args(parser)
    args = parser.parse_args(["/models/x", "--engine", "mock", "--tpot-ms", "2.5", "--max-model-len", "512",
                              "--kv-cache-gib", "0.5", "--dtype", "float32"])
    again = parser.parse_args(engine_argv(args, num_threads=3) + ["--port", "1"])
    assert again.num_threads == 3 and again.port == 1
    for name in ("model", "engine", "tpot_ms", "ttft_ms", "max_model_len", "kv_cache_gib", "dtype",
                 "max_num_seqs", "max_num_batched_tokens"):
        assert getattr(again, name) == getattr(args, name), name


def test_taken_gateway_port_fails_before_starting_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = GatewayConfig(port=taken.getsockname()[1])
        supervisor = Supervisor(LocalLauncher(["--engine", "mock"], Machine("cpu", 1)), Shape(1, 1), config)
        assert supervisor.run() == 1
        assert supervisor.replica_set.children[0].process is None


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (16, 4)])
def test_default_replica_count_on_a_cpu(cores, expected, monkeypatch):
    monkeypatch.setattr("os.path.exists", lambda path: False)
    assert default_replica_count(cores) == expected
