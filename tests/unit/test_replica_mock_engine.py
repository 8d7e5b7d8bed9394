"""The synthetic engine: tokenization, pacing-free stream contents, stops, aborts and load."""

from __future__ import annotations

import asyncio

import pytest

from scalellm.protocol.types import ChatPrompt, SamplingParams
from scalellm.replica.mock_engine import MockEngine, tokenize


def run(scenario, **kwargs):
    async def main():
        engine = MockEngine(**{"tpot_ms": 0.0, "max_model_len": 32, **kwargs})
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def collect(engine, prompt, params, request_id="r"):
    return [o async for o in engine.generate(request_id, prompt, params)]


def texts(outputs, index=0):
    return "".join(c.text for o in outputs for c in o.outputs if c.index == index)


def test_tokenize():
    assert len(tokenize("a  b\nc")) == 3
    assert tokenize([5, 6]) == [5, 6]
    chat = [{"role": "system", "content": "x y"}, {"role": "user", "content": "z"}]
    assert len(tokenize(ChatPrompt(chat))) == 6  # 3 words, 2 role markers and the reply's
    assert len(tokenize(ChatPrompt(chat, add_generation_prompt=False))) == 5
    assert len(tokenize(ChatPrompt([{"role": "user", "content": ""}]))) == 2  # never empty, like a template
    assert len(tokenize(" ")) == 1


def test_stream_and_metrics():
    async def scenario(engine):
        outputs = await collect(engine, "a b c", SamplingParams(max_tokens=3))
        assert texts(outputs) == "tok0 tok1 tok2"
        assert [o.finished for o in outputs] == [False, False, True]
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert outputs[-1].metrics.first_token_time > 0 and outputs[0].metrics is None
        assert all(o.num_prompt_tokens == 3 for o in outputs)
    run(scenario)


def test_max_tokens_none_fills_the_context():
    async def scenario(engine):
        outputs = await collect(engine, "a b", SamplingParams(max_tokens=None))
        assert sum(len(c.token_ids) for o in outputs for c in o.outputs) == 30
    run(scenario)


@pytest.mark.parametrize("include, expected", [(False, "tok0 "), (True, "tok0 tok1")])
def test_stop_string(include, expected):
    async def scenario(engine):
        params = SamplingParams(max_tokens=10, stop=["tok1"], include_stop_str_in_output=include)
        outputs = await collect(engine, "a", params)
        last = outputs[-1].outputs[-1]
        assert texts(outputs) == expected
        assert (last.finish_reason, last.stop_reason) == ("stop", "tok1")
    run(scenario)


def test_stop_token_id_respects_min_tokens():
    async def scenario(engine):
        outputs = await collect(engine, "a", SamplingParams(max_tokens=10, stop_token_ids=[1, 4], min_tokens=3))
        assert texts(outputs) == "tok0 tok1 tok2 tok3"
        assert outputs[-1].outputs[-1].stop_reason == 4
    run(scenario)


def test_n_samples_and_logprobs():
    async def scenario(engine):
        outputs = await collect(engine, "a", SamplingParams(n=2, max_tokens=2, logprobs=1))
        for index in (0, 1):
            assert texts(outputs, index) == "tok0 tok1"
        position = outputs[0].outputs[0].logprobs[0]
        assert [lp.rank for lp in position.values()] == [1, 2]
        assert outputs[-1].outputs[0].cumulative_logprob == -1.0
    run(scenario)


@pytest.mark.parametrize("prompt, message", [("", "empty"), ("w " * 40, "context")])
def test_bad_prompt_is_a_value_error(prompt, message):
    async def scenario(engine):
        with pytest.raises(ValueError, match=message):
            await collect(engine, prompt, SamplingParams())
    run(scenario)


def test_prompt_plus_max_tokens_over_context_is_a_value_error():
    async def scenario(engine):
        with pytest.raises(ValueError, match="exceeds"):
            await collect(engine, "a b", SamplingParams(max_tokens=31))
    run(scenario)


def test_abort_ends_the_stream_and_frees_the_load():
    async def scenario(engine):
        stream = engine.generate("r", "a b", SamplingParams(max_tokens=20))
        await stream.__anext__()
        assert engine.load().num_running == 1
        await engine.abort("r")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        load = engine.load()
        assert (load.num_running, load.num_tokens_in_flight) == (0, 0)
    run(scenario, tpot_ms=50.0)


def test_closing_the_iterator_aborts():
    async def scenario(engine):
        stream = engine.generate("r", "a", SamplingParams(max_tokens=20))
        await stream.__anext__()
        await stream.aclose()
        assert engine.load().num_running == 0 and engine.health().healthy
    run(scenario, tpot_ms=50.0)


def test_waiting_beyond_max_num_seqs():
    async def scenario(engine):
        tasks = [asyncio.create_task(collect(engine, "a", SamplingParams(max_tokens=2), f"r{i}"))
                 for i in range(3)]
        await asyncio.sleep(0.02)
        load = engine.load()
        assert (load.num_running, load.num_waiting) == (1, 2)
        # r0 has 1 output token to go; r1 and r2 their prompt token and 2 output tokens each.
        assert load.num_tokens_in_flight == 1 + 2 * 3
        results = await asyncio.gather(*tasks)
        assert all(texts(r) == "tok0 tok1" for r in results)
    run(scenario, tpot_ms=100.0, max_num_seqs=1)


def test_duplicate_request_id_is_a_value_error():
    async def scenario(engine):
        first = engine.generate("same", "a", SamplingParams(max_tokens=5))
        await first.__anext__()
        with pytest.raises(ValueError, match="already"):
            await collect(engine, "a", SamplingParams(), "same")
        await first.aclose()
    run(scenario, tpot_ms=50.0)


def test_health_before_start_and_after_shutdown():
    engine = MockEngine()
    assert not engine.health().healthy

    async def scenario(engine):
        assert engine.health().healthy
        await engine.shutdown()
        assert not engine.health().healthy
    run(scenario)
