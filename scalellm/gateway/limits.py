"""Admission limits: per-key token-bucket rate limiting (requests, and generated tokens) and a bounded
in-flight gate.

All are pure logic (the clock is injected) and never make a request wait: a request is admitted at
once or refused at once, with how long to wait before retrying. (Waiting for a fair share of a
saturated deployment is fair_share.py's.)
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

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._updated_at) * self.rate_per_s)
        self._updated_at = now

    def charge(self, amount: float, now: float) -> None:
        """Take `amount` tokens after the fact (what a finished request used); the bucket may go into debt."""
        self._refill(now)
        self._tokens -= amount

    def debt_wait_s(self, now: float) -> float:
        """0.0 when the bucket is not in debt, else the seconds until it is paid back."""
        self._refill(now)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s


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


class TokenRateLimiter:
    """Per-key limits of generated tokens per minute, each key at its own rate (`tpm=` in the key file).

    A request is admitted while its key's bucket is not in debt; what it generated is charged when it
    ends, so one request may overdraw and the key then waits until the debt is paid back (the
    Retry-After). The bucket holds a minute's worth, as RateLimiter's.
    """

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def _bucket(self, key: str, tokens_per_minute: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.capacity != tokens_per_minute:
            bucket = self._buckets[key] = TokenBucket(tokens_per_minute, tokens_per_minute / 60.0, self._clock())
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        return bucket

    def check(self, key: str, tokens_per_minute: float) -> int:
        """0 when `key` may send a request now, else the whole seconds to wait (for Retry-After)."""
        wait_s = self._bucket(key, tokens_per_minute).debt_wait_s(self._clock())
        return 0 if wait_s == 0.0 else max(1, math.ceil(wait_s))

    def charge(self, key: str, tokens_per_minute: float, num_tokens: int) -> None:
        """A request of `key` ended having generated `num_tokens`."""
        self._bucket(key, tokens_per_minute).charge(num_tokens, self._clock())
