"""Token-bucket rate limiting, the in-flight gate and the circuit breaker, with an injected clock."""

import pytest

from scalellm.gateway.health import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from scalellm.gateway.limits import AdmissionGate, RateLimiter, TokenBucket


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_bucket_burst_then_refill():
    bucket = TokenBucket(capacity=2, rate_per_s=1.0, now=0.0)
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == 0.0
    assert bucket.try_take(0.0) == pytest.approx(1.0)
    assert bucket.try_take(0.5) == pytest.approx(0.5)
    assert bucket.try_take(1.0) == 0.0


def test_rate_limiter_per_key_with_retry_after():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, clock=clock)
    assert [limiter.check("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.check("a") == 20  # one token per 20 s
    assert limiter.check("b") == 0  # other keys have their own bucket
    clock.now += 20
    assert limiter.check("a") == 0
    assert limiter.check("a") >= 1


def test_rate_limiter_bounds_its_key_map():
    limiter = RateLimiter(60, max_keys=3, clock=Clock())
    for key in "abcdef":
        limiter.check(key)
    assert len(limiter._buckets) == 3


def test_rate_limiter_rejects_nonpositive_rate():
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_admission_gate_refuses_when_full():
    gate = AdmissionGate(2)
    assert gate.try_enter() and gate.try_enter()
    assert not gate.try_enter()
    gate.leave()
    assert gate.try_enter()


def test_circuit_breaker_opens_half_opens_and_closes():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=clock)
    breaker.record_failure()
    assert breaker.state == CLOSED and breaker.allows_traffic()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allows_traffic()
    clock.now += 5
    assert breaker.state == HALF_OPEN and breaker.allows_traffic()
    breaker.record_failure()  # one failure while half-open reopens
    assert breaker.state == OPEN
    clock.now += 5
    breaker.record_success()
    assert breaker.state == CLOSED


def test_success_resets_consecutive_count():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == CLOSED
