"""The local launcher's replica sets and the supervisor's side of a shape change, without servers."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from scalellm.deploy.local import LocalLauncher, LocalReplicaSet
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.control import ReplicaSetUpdate
from scalellm.process import ChildProcess
from scalellm.shape.shape import Machine, Shape
from scalellm.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def test_launcher_gives_each_replica_a_port_and_the_shape_parallelism():
    launcher = LocalLauncher(["--engine", "mock", "--num-threads", "7"], Machine("cpu", 2), lend_cores=False)
    replica_set = launcher.build(Shape(2, 1))
    assert replica_set.shape == Shape(2, 1) and len(replica_set.children) == 2
    assert len(set(replica_set.addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in replica_set.addresses)
    for child, address in zip(replica_set.children, replica_set.addresses):
        argv = child.argv
        assert argv[1:4] == ["-m", "scalellm.cli", "replica"]
        assert argv[argv.index("--port") + 1] == address.rsplit(":", 1)[1]
        threads = [argv[i + 1] for i, a in enumerate(argv) if a == "--num-threads"]
        assert threads[-1] == "1"  # the shape's flag comes last and wins
        assert child.extra_env == {}
    gpu_set = LocalLauncher([], Machine("cuda", 2)).build(Shape(2, 1))
    assert [c.extra_env for c in gpu_set.children] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]


def test_child_with_open_stdin_gets_later_lines_and_its_data_again_after_a_restart(tmp_path):
    out = tmp_path / "lines"
    code = f"import sys\nfor line in sys.stdin:\n    open({str(out)!r}, 'a').write(line)\n    if line == 'exit\\n': break"
    child = ChildProcess("reader", [sys.executable, "-c", code], b"first\n", keep_stdin_open=True)
    child.start()
    assert child.send(b"second\n") and child.send(b"exit\n")
    child.process.wait(10)
    child.send(b"lost\n")  # the reader is gone: writing may fail but never raises
    child.stdin_data = b"again\n"
    child.check_restart(time.monotonic())
    child.send(b"exit\n")
    child.process.wait(10)
    assert out.read_text() == "first\nsecond\nexit\nagain\nexit\n"
    child.stop(1.0)


def test_switch_tells_the_gateway_and_a_restarted_gateway_learns_the_latest_set():
    config = GatewayConfig(replica_addresses=("127.0.0.1:1",), port=0)
    supervisor = Supervisor(LocalLauncher([], Machine("cpu", 2)), Shape(1, 2), config)
    (address,) = supervisor.replica_set.addresses
    first_line, update_line = supervisor.gateway.stdin_data.splitlines()
    assert json.loads(first_line)["replica_addresses"] == [address]
    assert ReplicaSetUpdate.decode(update_line) == ReplicaSetUpdate((address,), Shape(1, 2))
    new_set = LocalReplicaSet(Shape(2, 1), [ChildProcess("r", ["true"]), ChildProcess("s", ["true"])],
                         ["127.0.0.1:2", "127.0.0.1:3"])
    supervisor.adopt(new_set)
    old_set = supervisor.switch_to(new_set, "load 40")
    assert old_set.shape == Shape(1, 2) and supervisor.replica_set is new_set
    assert supervisor.replica_set.names == ["r", "s"]
    first_line, update_line = supervisor.gateway.stdin_data.splitlines()
    assert json.loads(first_line)["replica_addresses"] == ["127.0.0.1:2", "127.0.0.1:3"]
    assert ReplicaSetUpdate.decode(update_line) == ReplicaSetUpdate(("127.0.0.1:2", "127.0.0.1:3"), Shape(2, 1),
                                                                    "load 40")
    assert supervisor._other_sets == [old_set]
    supervisor.release(old_set)
    assert supervisor._other_sets == []


def test_replica_set_needs_one_address_per_process():
    with pytest.raises(ValueError):
        LocalReplicaSet(Shape(2, 1), [ChildProcess("r", ["true"])], ["a:1", "a:2"])


def test_replicas_of_a_cpu_set_lend_each_other_their_cores_through_one_board():
    launcher = LocalLauncher(["--engine", "mock"], Machine("cpu", 4))
    replica_set = launcher.build(Shape(2, 1))
    try:
        board = replica_set.core_board
        assert board is not None and open(board, "rb").read() == bytes(2)
        for slot, child in enumerate(replica_set.children):
            argv = child.argv
            assert argv[argv.index("--core-board") + 1] == board
            assert argv[argv.index("--core-board-slot") + 1] == str(slot)
            assert argv[argv.index("--threads-when-alone") + 1] == "4"
    finally:
        replica_set.stop(1.0)  # never started: only the board is removed
    assert replica_set.core_board is None and not os.path.exists(board)
    for shape, lends in ((Shape(1, 4), False), (Shape(4, 1), True)):  # one replica has nobody to borrow from
        other = launcher.build(shape)
        assert (other.core_board is not None) == lends
        other.stop(1.0)
    assert LocalLauncher([], Machine("cpu", 4), lend_cores=False).build(Shape(2, 1)).core_board is None
    assert LocalLauncher([], Machine("cuda", 2)).build(Shape(2, 1)).core_board is None
