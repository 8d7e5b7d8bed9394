"""Supervisor and child-process pieces without a server: restart backoff, forced stop, ports, threads, CLI flags."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import pytest

from scalellm.deploy.local import LocalLauncher, default_replica_count, threads_per_replica
from scalellm.flags import from_json, to_json
from scalellm.gateway.config import GatewayConfig
from scalellm.process import ChildProcess, free_ports
from scalellm.replica.config import ReplicaConfig
from scalellm.replica.launch import add_replica_args, engine_flags, replica_config
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


def test_replica_flags_and_their_json_give_the_same_config():
    parser = argparse.ArgumentParser()
    add_replica_args(parser)
    args = parser.parse_args(["/models/x", "--engine", "mock", "--tpot-ms", "2.5", "--max-model-len", "512",
                              "--kv-cache-gib", "0.5", "--dtype", "float32", "-tp", "2", "--no-fused-decode",
                              "--port", "7"])
    config = replica_config(args)
    assert config.port == 7 and config.mock.tpot_ms == 2.5 and config.engine.model == "/models/x"
    assert config.engine.tensor_parallel_size == 2 and not config.engine.fused_decode
    assert from_json(ReplicaConfig, to_json(config)) == config
    again = parser.parse_args(engine_flags(config) + ["--port", "7"])
    assert replica_config(again) == config
    assert engine_flags(ReplicaConfig()) == []  # defaults need no flag


def test_bad_flag_values_are_refused_by_the_config_itself():
    parser = argparse.ArgumentParser()
    add_replica_args(parser)
    with pytest.raises(ValueError, match="max_num_seqs"):
        replica_config(parser.parse_args(["--max-num-seqs", "0"]))
    with pytest.raises(ValueError, match="tpot_ms"):
        replica_config(parser.parse_args(["--engine", "mock", "--tpot-ms", "-1"]))
    with pytest.raises(ValueError, match="has no field"):
        from_json(ReplicaConfig, '{"engine": {"modle": "x"}}')


def test_taken_gateway_port_fails_before_starting_anything():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = GatewayConfig(port=taken.getsockname()[1])
        supervisor = Supervisor(LocalLauncher(ReplicaConfig(), Machine("cpu", 1)), Shape(1, 1), config)
        assert supervisor.run() == 1
        assert supervisor.replica_set.children[0].process is None


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (16, 4)])
def test_default_replica_count_on_a_cpu(cores, expected, monkeypatch):
    monkeypatch.setattr("os.path.exists", lambda path: False)
    assert default_replica_count(cores) == expected
