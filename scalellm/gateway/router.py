"""The router: replica states, load accounting, and the choice of a replica for each attempt.

Load accounting has one path for every request: `dispatch()` adds the request's estimated tokens to
the chosen replica and returns a `Dispatch`; `Dispatch.finish(ok)` takes them off again, exactly
once, whether the request completed, failed, timed out or the client went away.

The replica set can be replaced at runtime (`replace_replicas`, when the deployment changes shape):
from then on new requests go to the new set only, while requests already dispatched to a replica
taken out finish there (their `Dispatch` keeps its state). Indices are never reused, so a request's
set of tried replicas stays valid across a replacement.
"""

from __future__ import annotations

from typing import Callable, Sequence

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
        self.policy = policy
        self._metrics = metrics
        self._breaker_settings = (breaker_failure_threshold, breaker_cooldown_s)
        self._next_index = 0
        self.replicas: list[ReplicaState] = [self._new_state(client) for client in clients]

    def _new_state(self, client) -> ReplicaState:
        state = ReplicaState(self._next_index, client, CircuitBreaker(*self._breaker_settings))
        self._next_index += 1
        self._metrics.set_replica_healthy(state.address, True)
        return state

    def replace_replicas(self, addresses: Sequence[str], make_client: Callable[[str], object]
                         ) -> list[ReplicaState]:
        """Route new requests to `addresses` only; returns the states taken out, which finish what they have.

        An address already in the set keeps its state (client, load, breaker); `make_client` builds
        the clients of the others. The caller closes the clients of the returned states once their
        `num_requests_in_flight` is zero.
        """
        if not addresses:
            raise ValueError("the replica set cannot be empty")
        current = {state.address: state for state in self.replicas}
        self.replicas = [current.get(address) or self._new_state(make_client(address)) for address in addresses]
        return [state for address, state in current.items() if address not in set(addresses)]

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
