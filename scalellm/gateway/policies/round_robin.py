"""Round robin: replicas take turns, whatever their load."""

from __future__ import annotations

from typing import Sequence

from scalellm.gateway.policies.base import ReplicaView, RouteRequest, RoutingPolicy


class RoundRobinPolicy(RoutingPolicy):
    """Cycles through the replica indices; a replica that is not routable is skipped."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next_index = 0

    def choose(self, candidates: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        # The first candidate at or after the cursor, wrapping around: stable when the set changes.
        chosen = next((c for c in candidates if c.index >= self._next_index), candidates[0])
        self._next_index = chosen.index + 1
        return chosen
