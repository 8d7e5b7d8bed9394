"""Weighted fair sharing of a saturated deployment between API keys.

With `max_concurrent` set, the gateway sends at most that many requests to the replicas at once.
Beyond it requests wait, and when a slot frees it goes to the waiting key that has received the
least service for its weight (start-time fair queueing over generated tokens):

    virtual_time[key] += tokens / weight[key]        charged with the request's estimate when it is
                                                     let through, corrected by what it really generated
    next = the key with waiters and the smallest virtual_time (FIFO within a key)

A key that was idle starts at the current virtual time (`floor`), so idling banks no credit. Two keys
of equal weight that keep the deployment saturated therefore get equal tokens per second; weight 2
gets twice weight 1's. Unsaturated, requests go through at once in arrival order. The queue is
bounded by the gateway's in-flight cap (limits.AdmissionGate) and the wait by the request timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FairShare:
    """Slots to the replicas, handed out by weighted fair share between keys."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.num_active = 0
        self._waiting: dict[str, deque[tuple[asyncio.Future, float, float]]] = {}
        self._virtual_time: dict[str, float] = {}
        self._floor = 0.0

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    async def acquire(self, key: str, weight: float, estimate: float) -> None:
        """Wait for a slot; the caller must `release` it exactly once (also when cancelled after this returns)."""
        if self.num_active < self.max_concurrent and not self._waiting:
            self._start(key, weight, estimate)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, deque()).append((future, weight, estimate))
        try:
            await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                self._forget(key, future)
            else:  # the slot was handed over as the wait was cancelled: give it back
                self.release(key, weight, estimate, 0)
            raise

    def release(self, key: str, weight: float, estimate: float, num_tokens: int) -> None:
        """A request let through ended having generated `num_tokens`: correct its charge, free its slot."""
        self._virtual_time[key] = self._virtual_time.get(key, self._floor) + (num_tokens - estimate) / weight
        self.num_active -= 1
        self._wake()

    def _start(self, key: str, weight: float, estimate: float) -> None:
        start = max(self._virtual_time.get(key, self._floor), self._floor)
        self._floor = start
        self._virtual_time[key] = start + estimate / weight
        self.num_active += 1

    def _wake(self) -> None:
        while self.num_active < self.max_concurrent and self._waiting:
            key = min(self._waiting, key=lambda k: max(self._virtual_time.get(k, self._floor), self._floor))
            queue = self._waiting[key]
            future, weight, estimate = queue.popleft()
            if not queue:
                del self._waiting[key]
            self._start(key, weight, estimate)
            future.set_result(None)

    def _forget(self, key: str, future: asyncio.Future) -> None:
        queue = self._waiting.get(key)
        if queue is None:
            return
        self._waiting[key] = deque(item for item in queue if item[0] is not future)
        if not self._waiting[key]:
            del self._waiting[key]
