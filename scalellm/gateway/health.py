"""Replica health: a circuit breaker per replica (passive failures) and an active probe loop.

A replica is routable when its last probe succeeded (or none ran yet) and its breaker lets traffic
through. So a replica that stops answering (hung, SIGSTOPped: its socket still open) leaves routing
at its first failed probe, within interval_s + timeout_s; once its breaker opens on probe failures
(`failure_threshold` probes in a row, within failure_threshold * (interval_s + timeout_s)) the
requests still waiting on it are aborted: non-streamed ones run again elsewhere, streams end with an
error event. Breaker states:

    closed ──K consecutive failures──▶ open ──cool-down elapsed──▶ half-open
      ▲                                  ▲                             │
      └─────────── success ──────────────┼──────── failure ────────────┘
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

logger = logging.getLogger("scalellm.gateway.health")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    """Counts consecutive failures of one replica; pure logic with an injected clock."""

    def __init__(self, failure_threshold: int = 3, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive_failures = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> str:
        """closed, open or half_open (open whose cool-down has elapsed)."""
        if self._opened_at is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self._opened_at >= self.cooldown_s else OPEN

    def allows_traffic(self) -> bool:
        """False only while open; half-open lets requests through until the next result decides."""
        return self._opened_at is None or self.state == HALF_OPEN

    def record_success(self) -> None:
        """A request or probe succeeded: close the breaker."""
        self._consecutive_failures = 0
        self._opened_at = None

    def record_failure(self) -> None:
        """A request or probe failed; open after `failure_threshold` in a row, or at once when half-open."""
        self._consecutive_failures += 1
        if self.state == HALF_OPEN or self._consecutive_failures >= self.failure_threshold:
            self._opened_at = self._clock()


class HealthMonitor:
    """Probes every replica's `health()` and `load()` each interval and updates the router's view."""

    def __init__(self, router, metrics, interval_s: float, timeout_s: float,
                 on_info: Callable[[str, int], None] | None = None) -> None:
        self._router = router
        self._metrics = metrics
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_info = on_info
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Probe every replica each interval from now on, on the running event loop (the first round
        one interval from now: the caller probes once itself, `probe_all()`, before it serves)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the probe loop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.probe_all()

    async def probe_all(self) -> None:
        """Probe all replicas concurrently once."""
        await asyncio.gather(*(self._probe(state) for state in self._router.replicas))

    async def _probe(self, state) -> None:
        try:
            health = await state.client.health(timeout_s=self._timeout_s)
            healthy, detail = health.healthy, health.detail
            if healthy:
                load = await state.client.load(timeout_s=self._timeout_s)
                state.update_polled_load(load)
                self._metrics.observe_replica_load(state.address, load)
                if self._on_info is not None and not state.info_known:
                    name, max_model_len, _ = await state.client.info(timeout_s=self._timeout_s * 2)
                    state.info_known = True
                    self._on_info(name, max_model_len)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any probe failure means "not healthy"; the reason goes to the log
            healthy, detail = False, f"{type(exc).__name__}: {exc}"
        self._router.set_probe_result(state, healthy)
        if not healthy:
            logger.warning("replica %s unhealthy: %s", state.address, detail)
            if state.breaker.state == OPEN:
                self._abort_in_flight(state)

    @staticmethod
    def _abort_in_flight(state) -> None:
        # In-process clients (no connection that can hang) have nothing to abort.
        abort = getattr(state.client, "abort_in_flight", None)
        num_aborted = abort() if abort is not None else 0
        if num_aborted:
            logger.warning("replica %s is down: aborted its %d requests in flight", state.address, num_aborted)
