"""Fair shares between API keys (weighted start-time fair queueing over generated tokens) and the
per-key generated-token limit, both with no sockets."""

import asyncio

import pytest

from scalellm.gateway.fair_share import FairShare
from scalellm.gateway.limits import TokenRateLimiter


def serve_order(weights: dict[str, float], num_each: int, tokens: int = 100, max_concurrent: int = 1) -> list[str]:
    """Every key queues num_each requests behind a busy deployment; the order the slots go in."""
    async def main():
        fair = FairShare(max_concurrent)
        order = []

        async def request(key):
            await fair.acquire(key, weights[key], tokens)
            order.append(key)
            await asyncio.sleep(0)
            fair.release(key, weights[key], tokens, tokens)

        await fair.acquire("busy", 1.0, 0)  # saturated: everyone below has to wait
        tasks = [asyncio.create_task(request(key)) for _ in range(num_each) for key in weights]
        await asyncio.sleep(0)
        fair.release("busy", 1.0, 0, 0)
        await asyncio.gather(*tasks)
        assert fair.num_active == 0 and fair.num_waiting == 0
        return order
    return asyncio.run(main())


def test_equal_weights_alternate_and_weights_share_in_proportion():
    order = serve_order({"a": 1.0, "b": 1.0}, 6)
    assert all(order[i:i + 2] in (["a", "b"], ["b", "a"]) for i in range(0, 12, 2))
    order = serve_order({"heavy": 2.0, "light": 1.0}, 8)
    first_nine = order[:9]
    assert first_nine.count("heavy") == 6 and first_nine.count("light") == 3


def test_a_key_that_overdrew_waits_for_the_others():
    async def main():
        fair = FairShare(1)
        await fair.acquire("a", 1.0, 10)
        fair.release("a", 1.0, 10, 500)  # generated far more than estimated
        await fair.acquire("b", 1.0, 10)
        order = []

        async def request(key):
            await fair.acquire(key, 1.0, 10)
            order.append(key)
            fair.release(key, 1.0, 10, 10)
        tasks = [asyncio.create_task(request(k)) for k in ("a", "b", "b", "b")]
        await asyncio.sleep(0)
        fair.release("b", 1.0, 10, 10)
        await asyncio.gather(*tasks)
        return order
    assert asyncio.run(main()) == ["b", "b", "b", "a"]


def test_unsaturated_requests_go_at_once_and_a_cancelled_wait_leaves_no_trace():
    async def main():
        fair = FairShare(2)
        await fair.acquire("a", 1.0, 1)
        await fair.acquire("b", 1.0, 1)
        waiter = asyncio.create_task(fair.acquire("c", 1.0, 1))
        await asyncio.sleep(0)
        assert fair.num_waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert fair.num_waiting == 0
        fair.release("a", 1.0, 1, 1)
        assert fair.num_active == 1
    asyncio.run(main())
    with pytest.raises(ValueError):
        FairShare(0)


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def test_token_limit_per_key_goes_into_debt_then_waits_it_out():
    clock = Clock()
    limiter = TokenRateLimiter(clock=clock)
    assert limiter.check("a", 60) == 0
    limiter.charge("a", 60, 90)  # a minute's worth is 60: 30 tokens of debt at 1 token/s
    assert limiter.check("a", 60) == 30 and limiter.check("b", 60) == 0
    clock.now += 29.5
    assert limiter.check("a", 60) == 1
    clock.now += 0.5
    assert limiter.check("a", 60) == 0


def test_priority_goes_first_and_may_pass_the_cap():
    async def main():
        fair = FairShare(1)
        await fair.acquire("low", 1.0, 10, priority=5)
        await fair.acquire("urgent", 1.0, 10, priority=-1)  # past the cap: the replica may preempt for it
        assert fair.num_active == 2
        order = []

        async def request(key, priority):
            await fair.acquire(key, 1.0, 10, priority)
            order.append(key)
            fair.release(key, 1.0, 10, 10, priority)
        tasks = [asyncio.create_task(request(*item)) for item in (("low", 5), ("mid", 1), ("low", 5), ("mid", 1))]
        await asyncio.sleep(0)
        assert fair.num_waiting == 4  # not more urgent than what runs: they wait
        fair.release("urgent", 1.0, 10, 10, -1)
        fair.release("low", 1.0, 10, 10, 5)
        await asyncio.gather(*tasks)
        return order
    assert asyncio.run(main()) == ["mid", "mid", "low", "low"]
