"""Routing policies and the router's load accounting, with fake replicas (no sockets)."""

import random
from dataclasses import dataclass

import pytest

from scalellm.gateway.metrics import GatewayMetrics
from scalellm.gateway.policies import RouteRequest, create_policy, policy_names
from scalellm.gateway.policies.prefix_affinity import PrefixAffinityPolicy
from scalellm.gateway.router import NoReplicaAvailable, Router


@dataclass
class FakeView:
    index: int
    address: str
    load_tokens: int = 0


def views(*loads):
    return [FakeView(i, f"r{i}:1", load) for i, load in enumerate(loads)]


class FakeClient:
    def __init__(self, address):
        self.address = address


def test_registry_names_and_unknown():
    assert policy_names() == ["least_load", "prefix_affinity", "round_robin"]
    with pytest.raises(ValueError, match="unknown routing policy"):
        create_policy("random_walk")


def test_round_robin_cycles_and_skips_missing():
    policy = create_policy("round_robin")
    replicas = views(0, 0, 0)
    assert [policy.choose(replicas, RouteRequest()).index for _ in range(4)] == [0, 1, 2, 0]
    without_one = [replicas[0], replicas[2]]
    assert [policy.choose(without_one, RouteRequest()).index for _ in range(3)] == [2, 0, 2]


def test_least_load_picks_lowest_and_spreads_ties():
    policy = create_policy("least_load")
    assert policy.choose(views(50, 10, 30), RouteRequest()).index == 1
    tied = views(0, 0, 5)
    assert {policy.choose(tied, RouteRequest()).index for _ in range(4)} == {0, 1}


def test_prefix_affinity_is_sticky_per_prefix():
    policy = create_policy("prefix_affinity")
    replicas = views(0, 0, 0, 0)
    chosen = {key: policy.choose(replicas, RouteRequest(key)).index for key in ("alpha", "beta", "gamma", "delta")}
    for key, index in chosen.items():
        assert all(policy.choose(replicas, RouteRequest(key)).index == index for _ in range(5))
    many = {policy.choose(replicas, RouteRequest(f"prompt {i}")).index for i in range(64)}
    assert many == {0, 1, 2, 3}


def test_prefix_affinity_only_moves_the_removed_replicas_keys():
    policy = create_policy("prefix_affinity")
    replicas = views(0, 0, 0)
    keys = [f"system prompt {i}" for i in range(60)]
    before = {k: policy.choose(replicas, RouteRequest(k)).index for k in keys}
    after = {k: policy.choose(replicas[:2], RouteRequest(k)).index for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != 2)


def test_prefix_affinity_yields_to_load_beyond_bound():
    policy = PrefixAffinityPolicy(load_bound=100, rng=random.Random(0))
    replicas = views(0, 0)
    preferred = policy.choose(replicas, RouteRequest("k")).index
    replicas[preferred].load_tokens = 100
    assert policy.choose(replicas, RouteRequest("k")).index == preferred  # within the bound
    replicas[preferred].load_tokens = 101
    assert policy.choose(replicas, RouteRequest("k")).index == 1 - preferred  # two choices: the lighter


def test_router_accounting_released_once_on_every_path():
    router = Router([FakeClient("a:1"), FakeClient("b:2")], create_policy("least_load"), GatewayMetrics())
    first = router.dispatch(RouteRequest("", 100))
    second = router.dispatch(RouteRequest("", 30))
    assert first.replica is not second.replica  # least load spreads
    assert sorted(s.load_tokens for s in router.replicas) == [30, 100]
    first.finish(True)
    first.finish(True)
    second.finish(None)
    assert [s.load_tokens for s in router.replicas] == [0, 0]
    assert [s.num_requests_in_flight for s in router.replicas] == [0, 0]


def test_router_breaker_takes_failing_replica_out_and_excludes():
    router = Router([FakeClient("a:1"), FakeClient("b:2")], create_policy("round_robin"), GatewayMetrics(),
                    breaker_failure_threshold=2, breaker_cooldown_s=60)
    for _ in range(2):
        router.dispatch(RouteRequest(), exclude=frozenset({1})).finish(False)
    assert not router.replicas[0].routable
    assert all(router.dispatch(RouteRequest()).replica.index == 1 for _ in range(3))
    with pytest.raises(NoReplicaAvailable):
        router.dispatch(RouteRequest(), exclude=frozenset({1}))


def test_probe_failure_marks_down_and_success_restores():
    router = Router([FakeClient("a:1")], create_policy("least_load"), GatewayMetrics())
    state = router.replicas[0]
    router.set_probe_result(state, False)
    assert not router.any_healthy()
    router.set_probe_result(state, True)
    assert router.any_healthy()
