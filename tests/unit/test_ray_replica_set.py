"""RayReplicaSet's bookkeeping over a fake Ray: addresses reported after start, a dead replica restarted
in its own bundle with its new address reported once, backoff when restarts fail, everything released
on stop. (A real cluster: tests/reliability/test_ray_launcher.py.)"""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

pytest.importorskip("ray")

import ray.util.placement_group  # noqa: E402,F401 - loaded, so that the fixture can patch it

from scalellm.deploy import ray as ray_launcher  # noqa: E402
from scalellm.replica.config import MockEngineConfig, ReplicaConfig  # noqa: E402
from scalellm.shape.shape import Machine, Shape  # noqa: E402


class Ref:
    """A pending or finished call: `value`, or `error` to raise, once `ready`."""

    def __init__(self) -> None:
        self.ready, self.value, self.error = False, None, None

    def resolve(self, value=None, error: BaseException | None = None) -> None:
        self.ready, self.value, self.error = True, value, error


class Method:
    def __init__(self) -> None:
        self.calls: list[Ref] = []

    def remote(self, *args) -> Ref:
        self.calls.append(Ref())
        return self.calls[-1]


class Actor:
    def __init__(self, options: dict, name: str) -> None:
        self.options, self.name, self.killed = options, name, False
        self.start, self.wait_exit, self.stop, self.request_stop = Method(), Method(), Method(), Method()


class ActorClass:
    def __init__(self) -> None:
        self.created: list[Actor] = []

    def options(self, **options):
        outer = self

        class Bound:
            def remote(self, name, config_json):
                outer.created.append(Actor(options, name))
                return outer.created[-1]

        return Bound()


class FakeRay:
    def wait(self, refs, num_returns=1, timeout=None):
        return [r for r in refs if r.ready], [r for r in refs if not r.ready]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, actor, no_restart=True):
        actor.killed = True


@pytest.fixture
def replica_set(monkeypatch):
    groups = []
    module = sys.modules["ray.util.placement_group"]  # the package's attribute of that name is the function
    monkeypatch.setattr(module, "placement_group",
                        lambda bundles, strategy: groups.append((bundles, strategy)) or _Group())
    monkeypatch.setattr(module, "remove_placement_group", lambda group: groups.clear())
    launcher = ray_launcher.RayLauncher(ReplicaConfig(mock=MockEngineConfig()), Machine("cpu", 4))
    launcher.actor_class = ActorClass()
    made = launcher.build(Shape(2, 1))
    made._ray = FakeRay()
    made.start()
    made.groups = groups
    return made


class _Group:
    def ready(self):
        ref = Ref()
        ref.resolve()
        return ref


def _started(replica_set, addresses):
    for actor, address in zip(replica_set.launcher.actor_class.created[-len(addresses):], addresses):
        actor.start.calls[-1].resolve(address)


def test_addresses_come_from_the_actors_once_they_listen(replica_set):
    assert replica_set.groups == [([{"CPU": 1.0}, {"CPU": 1.0}], "SPREAD")]
    assert replica_set.secret and replica_set.launcher.replica.secret == replica_set.secret
    created = replica_set.launcher.actor_class.created
    assert [a.options["scheduling_strategy"].placement_group_bundle_index for a in created] == [0, 1]
    assert all(a.options["num_cpus"] == 1.0 for a in created)
    _started(replica_set, ["10.0.0.2:5001", "10.0.0.3:5002"])
    asyncio.run(replica_set.wait_addresses(time.monotonic() + 5, lambda: False))
    assert replica_set.addresses == ["10.0.0.2:5001", "10.0.0.3:5002"]
    assert replica_set.check_restart(time.monotonic()) is False


def test_a_lost_replica_restarts_in_its_bundle_and_its_new_address_is_reported_once(replica_set):
    _started(replica_set, ["10.0.0.2:5001", "10.0.0.3:5002"])
    asyncio.run(replica_set.wait_addresses(time.monotonic() + 5, lambda: False))
    first = replica_set.launcher.actor_class.created[0]
    first.wait_exit.calls[-1].resolve(error=RuntimeError("ActorDiedError: the node died"))
    now = time.monotonic()
    assert replica_set.startup_failure(0).startswith("was lost")
    assert replica_set.check_restart(now) is False and first.killed
    assert replica_set.check_restart(now) is False  # the new actor is created, not yet listening
    created = replica_set.launcher.actor_class.created
    assert len(created) == 3 and created[2].options["scheduling_strategy"].placement_group_bundle_index == 0
    assert replica_set.addresses[0] == "10.0.0.2:5001"  # the old one until the new one listens
    created[2].start.calls[-1].resolve("10.0.0.3:6001")
    assert replica_set.check_restart(now) is True
    assert replica_set.addresses == ["10.0.0.3:6001", "10.0.0.3:5002"]
    assert replica_set.check_restart(now) is False


def test_failing_restarts_back_off(replica_set):
    _started(replica_set, ["10.0.0.2:5001", "10.0.0.3:5002"])
    asyncio.run(replica_set.wait_addresses(time.monotonic() + 5, lambda: False))
    created = replica_set.launcher.actor_class.created
    created[1].wait_exit.calls[-1].resolve(3)
    now = time.monotonic()
    replica_set.check_restart(now)
    replica_set.check_restart(now)
    created[2].start.calls[-1].resolve(error=RuntimeError("exited with code 1 before listening"))
    assert replica_set.check_restart(now) is False  # the second failure in a row: 1 s backoff
    replica_set.check_restart(now + 0.5)
    assert len(created) == 3
    replica_set.check_restart(now + 1.0)
    assert len(created) == 4 and created[3].options["scheduling_strategy"].placement_group_bundle_index == 1


def test_stop_kills_every_actor_and_removes_the_group(replica_set):
    _started(replica_set, ["10.0.0.2:5001", "10.0.0.3:5002"])
    replica_set.stop(0.1)
    assert all(actor.killed for actor in replica_set.launcher.actor_class.created)
    assert replica_set.groups == [] and replica_set.group is None


def test_too_few_free_cpus_names_the_shortage(monkeypatch):
    launcher = ray_launcher.RayLauncher(ReplicaConfig(mock=MockEngineConfig()), Machine("cpu", 4))
    monkeypatch.setattr("ray.available_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ValueError, match=r"cannot place 2 replicas of 2x2 \(4 CPU.*free now: 1 of 4 CPU"):
        launcher.check_fits(Shape(2, 2))
