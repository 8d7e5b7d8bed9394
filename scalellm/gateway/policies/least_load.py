"""Least load: the replica with the fewest estimated tokens in flight."""

from __future__ import annotations

from typing import Sequence

from scalellm.gateway.policies.base import ReplicaView, RouteRequest, RoutingPolicy


class LeastLoadPolicy(RoutingPolicy):
    """Picks the replica with the smallest `load_tokens`; ties go round robin so idle replicas share work."""

    name = "least_load"

    def __init__(self) -> None:
        self._tie_cursor = 0

    def choose(self, candidates: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        lowest = min(c.load_tokens for c in candidates)
        tied = [c for c in candidates if c.load_tokens == lowest]
        self._tie_cursor += 1
        return tied[self._tie_cursor % len(tied)]
