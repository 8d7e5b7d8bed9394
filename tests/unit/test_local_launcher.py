"""The local launcher's replica sets and the supervisor's side of a shape change, without servers."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from scalellm.config import EngineConfig
from scalellm.deploy.local import LocalLauncher, LocalReplicaSet
from scalellm.flags import from_json
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.control import ReplicaSetUpdate
from scalellm.process import ChildProcess
from scalellm.replica.config import MockEngineConfig, ReplicaConfig
from scalellm.shape.shape import Machine, Shape
from scalellm.supervisor import Supervisor

pytestmark = pytest.mark.timeout(60)


def replica_configs(replica_set) -> list[ReplicaConfig]:
    """What each replica process reads on its stdin."""
    for child in replica_set.children:
        assert child.argv[1:] == ["-m", "scalellm.cli", "replica", "--config-stdin"]
    return [from_json(ReplicaConfig, child.stdin_data) for child in replica_set.children]


def test_launcher_gives_each_replica_its_config_a_port_and_the_shape_parallelism():
    template = ReplicaConfig(EngineConfig(model="m", num_threads=7), MockEngineConfig(tpot_ms=3.0))
    replica_set = LocalLauncher(template, Machine("cpu", 2)).build(Shape(2, 1))
    assert replica_set.shape == Shape(2, 1) and len(replica_set.children) == 2 and replica_set.core_board is None
    assert len(set(replica_set.addresses)) == 2 and all(a.startswith("127.0.0.1:") for a in replica_set.addresses)
    for config, address, child in zip(replica_configs(replica_set), replica_set.addresses, replica_set.children):
        assert config.address == address
        assert config.engine == EngineConfig(model="m", num_threads=1)  # the shape's threads win
        assert config.mock == template.mock
        assert child.extra_env == {}
    gpu_set = LocalLauncher(ReplicaConfig(), Machine("cuda", 2)).build(Shape(2, 1))
    assert [c.extra_env for c in gpu_set.children] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert [c.engine.tensor_parallel_size for c in replica_configs(gpu_set)] == [1, 1]


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
    supervisor = Supervisor(LocalLauncher(ReplicaConfig(), Machine("cpu", 2)), Shape(1, 2), config)
    (address,) = supervisor.replica_set.addresses
    assert supervisor.gateway.stdin_data is None  # written once the replicas answered
    first_line, update_line = supervisor._gateway_input("").splitlines()
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
    launcher = LocalLauncher(ReplicaConfig(), Machine("cpu", 4))
    replica_set = launcher.build(Shape(2, 1))
    try:
        board = replica_set.core_board
        assert board is not None and open(board, "rb").read() == bytes(2)
        for slot, config in enumerate(replica_configs(replica_set)):
            assert (config.engine.core_board, config.engine.core_board_slot) == (board, slot)
            assert config.engine.threads_when_alone == 4 and config.engine.num_threads == 1
    finally:
        replica_set.stop(1.0)  # never started: only the board is removed
    assert replica_set.core_board is None and not os.path.exists(board)
    for shape, lends in ((Shape(1, 4), False), (Shape(4, 1), True)):  # one replica has nobody to borrow from
        other = launcher.build(shape)
        assert (other.core_board is not None) == lends
        other.stop(1.0)
    assert not LocalLauncher(ReplicaConfig(), Machine("cpu", 4), lend_cores=False).lends_cores(Shape(2, 1))
    assert not LocalLauncher(ReplicaConfig(mock=MockEngineConfig()), Machine("cpu", 4)).lends_cores(Shape(2, 1))
    assert not LocalLauncher(ReplicaConfig(), Machine("cuda", 2)).lends_cores(Shape(2, 1))
