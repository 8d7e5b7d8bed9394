"""Weighted fair sharing of a saturated deployment between API keys, under request priorities.

With `max_concurrent` set, the gateway sends at most that many requests to the replicas at once.
Beyond it requests wait, and when a slot frees it goes to the most urgent waiting priority (lower
first, as the replicas order their queues), and within it to the key that has received the least
service for its weight (start-time fair queueing over generated tokens):

    virtual_time[key] += tokens / weight[key]        charged with the request's estimate when it is
                                                     let through, corrected by what it really generated
    next = the waiting (priority, key) with the smallest (priority, virtual_time); FIFO within a key

A key that was idle starts at the current virtual time (`floor`), so idling banks no credit. Two keys
of equal weight that keep the deployment saturated therefore get equal tokens per second; weight 2
gets twice weight 1's. A request more urgent than one already let through may go past the cap (by at
most the number of less urgent ones running), so the replica can preempt one of them for it.
Unsaturated, requests go through at once in arrival order. The queue is bounded by the gateway's
in-flight cap (limits.AdmissionGate) and the wait by the request timeout.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque


class FairShare:
    """Slots to the replicas, handed out by priority, then weighted fair share between keys."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.num_active = 0
        self._active_priorities: Counter[int] = Counter()
        self._waiting: dict[tuple[int, str], deque[tuple[asyncio.Future, float, float]]] = {}
        self._virtual_time: dict[str, float] = {}
        self._floor = 0.0

    @property
    def num_waiting(self) -> int:
        return sum(len(queue) for queue in self._waiting.values())

    async def acquire(self, key: str, weight: float, estimate: float, priority: int = 0) -> None:
        """Wait for a slot; the caller must `release` it exactly once with the same arguments."""
        if self._may_start_now(priority):
            self._start(key, weight, estimate, priority)
            return
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((priority, key), deque()).append((future, weight, estimate))
        try:
            await future
        except asyncio.CancelledError:
            if not future.done() or future.cancelled():
                self._forget((priority, key), future)
            else:  # the slot was handed over as the wait was cancelled: give it back
                self.release(key, weight, estimate, 0, priority)
            raise

    def release(self, key: str, weight: float, estimate: float, num_tokens: int, priority: int = 0) -> None:
        """A request let through ended having generated `num_tokens`: correct its charge, free its slot."""
        self._virtual_time[key] = self._virtual_time.get(key, self._floor) + (num_tokens - estimate) / weight
        self.num_active -= 1
        self._active_priorities[priority] -= 1
        if not self._active_priorities[priority]:
            del self._active_priorities[priority]
        self._wake()

    def _may_start_now(self, priority: int) -> bool:
        if self._waiting and min(p for p, _ in self._waiting) <= priority:
            return False  # as urgent ones wait already: queue behind them
        return self._has_room(priority)

    def _has_room(self, priority: int) -> bool:
        """Below the cap, or over it by no more than the running requests less urgent than `priority`
        (each may be preempted for one more urgent request)."""
        num_less_urgent = sum(count for p, count in self._active_priorities.items() if p > priority)
        return self.num_active < self.max_concurrent + num_less_urgent

    def _start(self, key: str, weight: float, estimate: float, priority: int) -> None:
        start = max(self._virtual_time.get(key, self._floor), self._floor)
        self._floor = start
        self._virtual_time[key] = start + estimate / weight
        self.num_active += 1
        self._active_priorities[priority] += 1

    def _wake(self) -> None:
        while self._waiting:
            entry = min(self._waiting, key=lambda e: (e[0], max(self._virtual_time.get(e[1], self._floor),
                                                                 self._floor)))
            if not self._has_room(entry[0]):
                return
            queue = self._waiting[entry]
            future, weight, estimate = queue.popleft()
            if not queue:
                del self._waiting[entry]
            self._start(entry[1], weight, estimate, entry[0])
            future.set_result(None)

    def _forget(self, entry: tuple[int, str], future: asyncio.Future) -> None:
        queue = self._waiting.get(entry)
        if queue is None:
            return
        self._waiting[entry] = deque(item for item in queue if item[0] is not future)
        if not self._waiting[entry]:
            del self._waiting[entry]
