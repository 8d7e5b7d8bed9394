"""The routing-policy contract: pick one replica among the routable ones for a request."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol, Sequence


class ReplicaView(Protocol):
    """What a policy may know about a replica (the router's `ReplicaState` provides it)."""

    index: int
    """Stable position of the replica in the gateway's configuration."""
    address: str

    @property
    def load_tokens(self) -> int:
        """Estimated tokens in flight on the replica: prompt tokens to prefill plus output tokens to generate."""


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may know about the request being routed."""

    affinity_key: str = ""
    """The prompt's leading characters (used by prefix affinity)."""
    num_tokens: int = 0
    """Estimated tokens the request adds to a replica's load."""


class RoutingPolicy(ABC):
    """Chooses the replica for one request.

    The router calls `choose` with the replicas that are currently routable (healthy, breaker closed
    or half-open, not excluded by an earlier failed attempt of the same request); the list is never
    empty and is ordered by `index`. A policy keeps only its own bookkeeping (a counter, a random
    generator): load comes from `ReplicaView.load_tokens`, which the router keeps up to date on every
    dispatch, completion, failure and cancellation. `choose` must be cheap (it runs per request) and
    must not block or await.
    """

    name: str = ""

    @abstractmethod
    def choose(self, candidates: Sequence[ReplicaView], request: RouteRequest) -> ReplicaView:
        """Return one element of `candidates` (non-empty) to serve `request`."""
