"""The mock engine: the real engine over the fake model. Its tokenizer, the contents of its streams,
stops, aborts and load are the real engine's rules over made-up tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from scalellm.protocol.types import ChatPrompt, SamplingParams
from scalellm.engine.fake_model import fake_tokenizer
from scalellm.engine.input_processor import InputProcessor
from scalellm.replica.mock_engine import MockEngine


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


async def wait_load(engine, running, waiting=0, timeout_s=2.0):
    """Until the engine's load (its last step's) shows `running` and `waiting` requests."""
    deadline = time.monotonic() + timeout_s
    while (engine.load().num_running, engine.load().num_waiting) != (running, waiting):
        assert time.monotonic() < deadline, engine.load()
        await asyncio.sleep(0.01)


def test_tokenizer_counts_words_and_renders_chats_like_a_template():
    processor = InputProcessor(fake_tokenizer(), 32000, 64, ())
    assert len(processor.tokenize("a  b\nc")) == 3
    assert processor.tokenize([5, 6]) == [5, 6]
    assert processor.tokenize("tok7 word") == [7, 31999]  # tokK is id K, other words <unk>
    chat = [{"role": "system", "content": "x y"}, {"role": "user", "content": "z"}]
    assert len(processor.tokenize(ChatPrompt(chat))) == 6  # 3 words, 2 role markers and the reply's
    assert len(processor.tokenize(ChatPrompt(chat, add_generation_prompt=False))) == 5
    assert fake_tokenizer().decode([0, 1, 2]) == "tok0 tok1 tok2"


def test_stream_and_metrics():
    async def scenario(engine):
        outputs = await collect(engine, "a b c", SamplingParams(max_tokens=3))
        assert texts(outputs) == "tok0 tok1 tok2"
        # One output per step, unless the reader fell behind and the engine merged some (never the last).
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True] and len(outputs) >= 2
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert outputs[-1].metrics.first_token_time > 0 and outputs[0].metrics is None
        assert all(o.num_prompt_tokens == 3 for o in outputs)
    run(scenario, tpot_ms=20.0)


def test_steps_fall_on_the_cadence():
    async def scenario(engine):
        started = time.monotonic()
        outputs = await collect(engine, "a b c", SamplingParams(max_tokens=5))
        elapsed = time.monotonic() - started
        assert texts(outputs) == "tok0 tok1 tok2 tok3 tok4"
        assert 5 * 0.04 - 0.045 <= elapsed < 5 * 0.04 + 0.5  # 5 steps 40 ms apart (the first on the next tick)
    run(scenario, tpot_ms=40.0)


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
        assert texts(outputs) == "tok0 tok1 tok2 tok3 tok4"  # a stop token that is not special is text
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


def test_max_tokens_is_capped_to_the_context_left():
    async def scenario(engine):
        outputs = await collect(engine, "a b", SamplingParams(max_tokens=31))
        assert sum(len(c.token_ids) for o in outputs for c in o.outputs) == 30
        assert outputs[-1].outputs[0].finish_reason == "length"
    run(scenario)


def test_abort_ends_the_stream_and_frees_the_load():
    async def scenario(engine):
        stream = engine.generate("r", "a b", SamplingParams(max_tokens=20))
        await stream.__anext__()
        await wait_load(engine, 1)
        await engine.abort("r")
        rest = [o async for o in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        await wait_load(engine, 0)
        assert engine.load().num_tokens_in_flight == 0 and engine.load().num_free_blocks == 256
    run(scenario, tpot_ms=50.0)


def test_closing_the_iterator_aborts():
    async def scenario(engine):
        stream = engine.generate("r", "a", SamplingParams(max_tokens=20))
        await stream.__anext__()
        await stream.aclose()
        await wait_load(engine, 0)
        assert engine.health().healthy
    run(scenario, tpot_ms=50.0)


def test_waiting_beyond_max_num_seqs():
    async def scenario(engine):
        tasks = [asyncio.create_task(collect(engine, "a", SamplingParams(max_tokens=2), f"r{i}"))
                 for i in range(3)]
        seen = set()
        while not all(task.done() for task in tasks):
            load = engine.load()
            seen.add((load.num_running, load.num_waiting, load.num_tokens_in_flight))
            await asyncio.sleep(0.01)
        assert max(running for running, _, _ in seen) == 1 and max(waiting for _, waiting, _ in seen) == 2
        # Each waiting request has its prompt token and 2 output tokens to go.
        assert all(tokens >= 3 * waiting for _, waiting, tokens in seen)
        results = await asyncio.gather(*tasks)
        assert all(texts(r) == "tok0 tok1" for r in results)
    run(scenario, tpot_ms=50.0, max_num_seqs=1)


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
