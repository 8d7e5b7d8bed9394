"""The router: replica states, load accounting, and the choice of a replica for each attempt.

Load accounting has one path for every request: `dispatch()` adds the request's estimated tokens to
the chosen replica and returns a `Dispatch`; `Dispatch.finish(ok)` takes them off again, exactly
once, whether the request completed, failed, timed out or the client went away.
"""

from __future__ import annotations

from typing import Sequence

from scalellm.gateway.health import HALF_OPEN, CircuitBreaker
from scalellm.gateway.policies import RouteRequest, RoutingPolicy
from scalellm.protocol.types import EngineLoad


class NoReplicaAvailable(Exception):
    """No replica is routable (all down, or all already tried by this request)."""


class ReplicaState:
    """The gateway's view of one replica: its client, health and the load it sent there."""

    def __init__(self, index: int, client, breaker: CircuitBreaker) -> None:
        self.index = index
        self.client = client
        self.address: str = client.address
        self.breaker = breaker
        self.probe_healthy = True
        self.info_known = False
        self.num_requests_in_flight = 0
        self.num_tokens_in_flight = 0
        self._external_tokens = 0

    @property
    def load_tokens(self) -> int:
        """Tokens this gateway has in flight there plus, from the last Load poll, load from elsewhere."""
        return self.num_tokens_in_flight + self._external_tokens

    @property
    def routable(self) -> bool:
        """True when the last probe passed and the breaker lets traffic through."""
        return self.probe_healthy and self.breaker.allows_traffic()

    def update_polled_load(self, load: EngineLoad) -> None:
        """Correct the estimate with the replica's own count (other gateways, estimate drift)."""
        self._external_tokens = max(0, load.num_tokens_in_flight - self.num_tokens_in_flight)


class Dispatch:
    """One attempt of a request on one replica; `finish` releases its load exactly once."""

    __slots__ = ("replica", "num_tokens", "_router", "_done")

    def __init__(self, router: "Router", replica: ReplicaState, num_tokens: int) -> None:
        self._router = router
        self.replica = replica
        self.num_tokens = num_tokens
        self._done = False

    def finish(self, ok: bool | None) -> None:
        """ok=True success, False replica failure (counts for the breaker), None neither (user error, cancel)."""
        if self._done:
            return
        self._done = True
        self._router.release(self, ok)


class Router:
    """Keeps the replica states and asks the routing policy to pick among the routable ones."""

    def __init__(self, clients: Sequence, policy: RoutingPolicy, metrics,
                 breaker_failure_threshold: int = 3, breaker_cooldown_s: float = 5.0) -> None:
        self.replicas = [ReplicaState(i, client, CircuitBreaker(breaker_failure_threshold, breaker_cooldown_s))
                         for i, client in enumerate(clients)]
        self.policy = policy
        self._metrics = metrics
        for state in self.replicas:
            metrics.set_replica_healthy(state.address, True)

    def any_healthy(self) -> bool:
        """True when at least one replica is routable."""
        return any(state.routable for state in self.replicas)

    def dispatch(self, request: RouteRequest, exclude: frozenset[int] = frozenset()) -> Dispatch:
        """Choose a replica not in `exclude` and account the request's tokens to it."""
        candidates = [s for s in self.replicas if s.index not in exclude and s.routable]
        if not candidates:
            raise NoReplicaAvailable
        state = self.policy.choose(candidates, request)
        state.num_requests_in_flight += 1
        state.num_tokens_in_flight += request.num_tokens
        self._metrics.replica_dispatched(state.address)
        return Dispatch(self, state, request.num_tokens)

    def release(self, dispatch: Dispatch, ok: bool | None) -> None:
        """Undo a dispatch's accounting and feed its outcome to the breaker (use `Dispatch.finish`)."""
        state = dispatch.replica
        state.num_requests_in_flight -= 1
        state.num_tokens_in_flight -= dispatch.num_tokens
        if ok is True:
            state.breaker.record_success()
        elif ok is False:
            state.breaker.record_failure()
            self._metrics.replica_failed(state.address)
            self._metrics.set_replica_healthy(state.address, state.routable)

    def set_probe_result(self, state: ReplicaState, healthy: bool) -> None:
        """Record an active probe's outcome."""
        state.probe_healthy = healthy
        if not healthy:
            state.breaker.record_failure()
        elif state.breaker.state == HALF_OPEN:
            state.breaker.record_success()  # an open breaker waits out its cool-down first
        self._metrics.set_replica_healthy(state.address, state.routable)
