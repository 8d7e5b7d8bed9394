"""Admission limits: per-key token-bucket rate limiting and a bounded in-flight gate.

Both are pure logic (the clock is injected) and never make a request wait: a request is admitted at
once or refused at once, with how long to wait before retrying.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Callable


class TokenBucket:
    """`capacity` tokens, refilled at `rate_per_s`; each admitted request takes one."""

    __slots__ = ("capacity", "rate_per_s", "_tokens", "_updated_at")

    def __init__(self, capacity: float, rate_per_s: float, now: float) -> None:
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self._tokens = capacity
        self._updated_at = now

    def try_take(self, now: float) -> float:
        """Take one token; return 0.0 when admitted, else the seconds until a token will be there."""
        self._tokens = min(self.capacity, self._tokens + (now - self._updated_at) * self.rate_per_s)
        self._updated_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


class RateLimiter:
    """One token bucket per key: `requests_per_minute` sustained, a minute's worth as burst.

    Buckets of keys not seen for long are dropped (least recently used first) so the map stays bounded.
    """

    def __init__(self, requests_per_minute: float, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if requests_per_minute <= 0:
            raise ValueError("requests_per_minute must be > 0")
        self._capacity = max(1.0, requests_per_minute)
        self._rate_per_s = requests_per_minute / 60.0
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, key: str) -> int:
        """0 when `key` may send a request now, else the whole seconds to wait (for Retry-After)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._capacity, self._rate_per_s, now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        wait_s = bucket.try_take(now)
        return 0 if wait_s == 0.0 else max(1, math.ceil(wait_s))


class AdmissionGate:
    """Caps the requests in flight; `try_enter` refuses at once when full (no unbounded waiting)."""

    def __init__(self, max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0

    def try_enter(self) -> bool:
        """Admit one request if there is room; the caller must `leave()` exactly once afterwards."""
        if self.num_in_flight >= self.max_in_flight:
            return False
        self.num_in_flight += 1
        return True

    def leave(self) -> None:
        """A request admitted by `try_enter` ended."""
        self.num_in_flight -= 1
