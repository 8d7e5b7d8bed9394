"""Routing policies and their registry: `create_policy(name, **options)` builds one by name."""

from __future__ import annotations

from typing import Callable

from scalellm.gateway.policies.base import ReplicaView, RouteRequest, RoutingPolicy
from scalellm.gateway.policies.least_load import LeastLoadPolicy
from scalellm.gateway.policies.prefix_affinity import PrefixAffinityPolicy
from scalellm.gateway.policies.round_robin import RoundRobinPolicy

_REGISTRY: dict[str, Callable[..., RoutingPolicy]] = {
    RoundRobinPolicy.name: lambda **_: RoundRobinPolicy(),
    LeastLoadPolicy.name: lambda **_: LeastLoadPolicy(),
    PrefixAffinityPolicy.name: lambda load_bound=4096, **_: PrefixAffinityPolicy(load_bound=load_bound),
}


def policy_names() -> list[str]:
    """Names accepted by `create_policy`."""
    return sorted(_REGISTRY)


def create_policy(name: str, **options) -> RoutingPolicy:
    """Build the policy registered under `name`; options a policy does not use are ignored."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(policy_names())}") from None
    return factory(**options)


__all__ = ["ReplicaView", "RouteRequest", "RoutingPolicy", "create_policy", "policy_names"]
