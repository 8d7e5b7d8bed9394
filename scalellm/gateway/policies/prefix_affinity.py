"""Prefix affinity: requests with the same prompt beginning go to the same replica (its prefix cache).

The preferred replica is chosen by rendezvous hashing of the prompt's leading characters, so when a
replica leaves or joins only its share of prefixes moves. When the preferred replica's load exceeds
the least loaded one's by more than `load_bound` tokens, affinity yields to balance: the request goes
to the less loaded of two randomly drawn replicas (power of two choices).
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from scalellm.gateway.policies.base import ReplicaView, RouteRequest, RoutingPolicy


class PrefixAffinityPolicy(RoutingPolicy):
    """Hash of the prompt prefix → preferred replica, bounded by load; power of two choices beyond the bound."""

    name = "prefix_affinity"

    def __init__(self, load_bound: int = 4096, rng: random.Random | None = None) -> None:
        self.load_bound = load_bound
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        preferred = max(candidates, key=lambda c: _score(request.affinity_key, c.address))
        lowest = min(c.load_tokens for c in candidates)
        if preferred.load_tokens - lowest <= self.load_bound:
            return preferred
        return self.power_of_two(candidates)

    def power_of_two(self, candidates: Sequence[ReplicaView]) -> ReplicaView:
        """The less loaded of two distinct replicas drawn at random."""
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(list(candidates), 2)
        return first if first.load_tokens <= second.load_tokens else second


def _score(key: str, address: str) -> int:
    digest = hashlib.blake2b(f"{address}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")
