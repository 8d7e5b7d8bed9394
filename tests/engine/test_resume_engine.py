"""Resuming a request with output tokens already delivered (failover): the continuation equals an
uninterrupted run, token for token and character for character, on the tiny model (greedy, seeded,
penalties; n = 1 and the unfinished samples of n = 3, with their cumulative logprobs) and on the
mock engine (stop strings held across the seam)."""

from __future__ import annotations

import asyncio
import collections
import math

import pytest

from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.engine.sampling.random_draw import position_seed
from scalellm.protocol.types import ResumedSample, SamplingParams, StructuredOutput
from scalellm.replica.mock_engine import MockEngine
from tests.engine.tiny_models import make_tiny_model

PROMPT = [5, 100, 2000, 300, 41, 7777, 12, 9, 8]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp("llama-resume"))
    make_tiny_model("llama", directory, tokenizer_dir, seed=0)
    return LLMEngine(EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01, block_size=4))


def resumed(token_ids) -> list[ResumedSample]:
    """A single-sample request's resume list: sample 0 after `token_ids` (none when empty)."""
    return [ResumedSample(0, tuple(token_ids))] if token_ids else []


def steps(engine: LLMEngine, request_id: str, params: SamplingParams, resume: list[int] = ()):
    """The request's delta outputs, one (token ids, text, finish reason) per step."""
    engine.add_request(request_id, PROMPT, params, delta=True, resumed_samples=resumed(resume))
    result = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            sample = output.outputs[0]
            result.append((sample.token_ids, sample.text, sample.finish_reason, output.num_prompt_tokens))
    return result


PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    "seeded": SamplingParams(temperature=1.0, top_p=0.9, seed=77, max_tokens=12, ignore_eos=True),
    "seeded with penalties": SamplingParams(temperature=0.8, seed=-5, max_tokens=12, ignore_eos=True,
                                            frequency_penalty=1.5, repetition_penalty=1.3, top_k=50),
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_continuation_equals_an_uninterrupted_run(engine, name):
    params = PARAMS[name]
    reference = steps(engine, f"ref-{name}", params)
    assert len(reference) == 12 and all(len(ids) == 1 for ids, *_ in reference)
    for cut in (1, 5, 11):
        delivered = [ids[0] for ids, *_ in reference[:cut]]
        resumed = steps(engine, f"resume-{name}-{cut}", params, delivered)
        assert resumed == reference[cut:], cut  # same tokens, same text deltas, prompt counted as before
    # a replica that drew other requests' samples before still draws the same tokens
    steps(engine, "noise", SamplingParams(temperature=1.0, seed=3, max_tokens=5, ignore_eos=True))
    assert steps(engine, f"again-{name}", params) == reference


def test_unseeded_continuation_follows_the_models_distribution(engine):
    """Unseeded sampling cannot repeat the lost run; the next token of a resumed request must be drawn
    from the model's distribution given the prompt and the delivered tokens (chi-square over top-5)."""
    delivered = [4321, 17, 999]
    reference = SamplingParams(temperature=0, max_tokens=1, logprobs=5, ignore_eos=True)
    engine.add_request("conditional", PROMPT + delivered, reference)
    (output,) = [o for o in _drain(engine) if o.request_id == "conditional"]
    top = output.outputs[0].logprobs[0]  # the model's 5 most likely next tokens (and the chosen one)
    tokens = sorted(top, key=lambda t: -top[t].logprob)[:5]
    weights = [math.exp(top[t].logprob) for t in tokens]
    expected = [w / sum(weights) for w in weights]
    assert max(expected) < 0.9, "a near-certain next token would make the test unable to fail"
    draws = 1500
    params = SamplingParams(temperature=1.0, top_k=5, max_tokens=len(delivered) + 1, ignore_eos=True)
    for i in range(draws):
        engine.add_request(f"draw-{i}", PROMPT, params, resumed_samples=resumed(delivered))
    drawn = collections.Counter(o.outputs[0].token_ids[-1] for o in _drain(engine) if o.finished)
    assert sum(drawn.values()) == draws and set(drawn) <= set(tokens)
    chi_square = sum((drawn[t] - draws * p) ** 2 / (draws * p) for t, p in zip(tokens, expected))
    assert chi_square < 23.5, (drawn, expected)  # 4 degrees of freedom, p = 1e-4


def _drain(engine: LLMEngine):
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    return outputs


def test_structured_output_resumes_from_the_delivered_tokens(engine):
    regex = StructuredOutput("regex", r"[a-c]{3,8}-\d{2,6}")
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, structured=regex)
    reference = steps(engine, "ref-regex", params)
    assert len(reference) >= 3 and reference[-1][2] == "stop"
    for cut in (1, len(reference) // 2, len(reference) - 1):
        delivered = [i for ids, *_ in reference[:cut] for i in ids]
        assert steps(engine, f"resume-regex-{cut}", params, delivered) == reference[cut:]
    digits = engine.tokenizer.encode("99", add_special_tokens=False)
    with pytest.raises(ValueError, match="grammar"):  # a regex output cannot start with digits
        engine.add_request("off-grammar", PROMPT, params, resumed_samples=resumed(digits))


def sample_steps(engine: LLMEngine, request_id: str, params: SamplingParams, resume=()) -> dict[int, list]:
    """Per sample index, its delta outputs in order: (token ids, text, finish reason, cumulative logprob)."""
    engine.add_request(request_id, PROMPT, params, delta=True, resumed_samples=resume)
    per_sample = collections.defaultdict(list)
    while engine.has_unfinished_requests():
        for output in engine.step():
            for sample in output.outputs:
                per_sample[sample.index].append((sample.token_ids, sample.text, sample.finish_reason,
                                                 sample.cumulative_logprob))
    return dict(per_sample)


N_PARAMS = {
    "greedy": SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True, logprobs=0),
    "seeded": SamplingParams(n=3, temperature=1.0, seed=2024, max_tokens=12, ignore_eos=True, logprobs=0),
}
FINISHED = None
"""A cut after a sample's last chunk: it finished before the failure and is not resumed."""


@pytest.mark.parametrize("name", list(N_PARAMS))
@pytest.mark.parametrize("cuts", [(5, 1, FINISHED), (FINISHED, 0, 11)])
def test_unfinished_samples_of_n_continue_each_after_its_own_tokens(engine, name, cuts):
    params = N_PARAMS[name]
    reference = sample_steps(engine, f"ref-n-{name}-{cuts}", params)
    assert sorted(reference) == [0, 1, 2] and all(len(chunks) == 12 for chunks in reference.values())
    assert all(len(ids) == 1 for chunks in reference.values() for ids, *_ in chunks)
    if name == "seeded":
        assert len({tuple(ids[0] for ids, *_ in chunks) for chunks in reference.values()}) == 3
    to_resume = [ResumedSample(index, tuple(ids[0] for ids, *_ in reference[index][:cut]),
                               reference[index][cut - 1][3] if cut else None)
                 for index, cut in enumerate(cuts) if cut is not FINISHED]
    continued = sample_steps(engine, f"resume-n-{name}-{cuts}", params, to_resume)
    assert sorted(continued) == [s.index for s in to_resume]  # the finished sample is not run again
    for sample in to_resume:
        cut, expected, got = len(sample.token_ids), reference[sample.index], continued[sample.index]
        assert [c[:3] for c in got] == [c[:3] for c in expected[cut:]], (sample.index, cut)
        # the text reads on from what was delivered; the sum of logprobs continues across the seam
        assert "".join(c[1] for c in expected[:cut] + got) == "".join(c[1] for c in expected)
        assert [c[3] for c in got] == pytest.approx([c[3] for c in expected[cut:]], rel=1e-5, abs=1e-5)
        assert got[-1][3] < (sample.cumulative_logprob or 0.0)  # so it did not restart at 0


def test_resume_checks_what_it_is_given(engine):
    params = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(ValueError, match="nothing is left"):
        engine.add_request("full", PROMPT, params, resumed_samples=resumed([1, 2, 3]))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", PROMPT, params, resumed_samples=resumed([10**9]))
    three = SamplingParams(n=3, temperature=0, max_tokens=3)
    bad_samples = {
        "not a sample of this request": [ResumedSample(3, (1,))],
        "listed twice": [ResumedSample(1, (1,)), ResumedSample(1, (2,))],
        "token ids": [ResumedSample(0, (1,)), ResumedSample(2, (-1,))],
        "nothing is left": [ResumedSample(0, (1,)), ResumedSample(2, (1, 2, 3))],
    }
    for message, samples in bad_samples.items():
        with pytest.raises(ValueError, match=message):
            engine.add_request(f"bad-{message}", PROMPT, three, resumed_samples=samples)
    assert not engine.has_unfinished_requests()


def test_position_seed_separates_seed_sample_and_position():
    seeds = {position_seed(seed, sample, position) for seed in (0, 1, -1) for sample in (0, 1)
             for position in range(50)}
    assert len(seeds) == 3 * 2 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def _mock_run(params: SamplingParams, resume: list[int] = ()) -> list[tuple[list[int], str, str | None]]:
    async def main():
        engine = MockEngine(tpot_ms=5.0, max_model_len=64)
        await engine.start()
        try:
            outputs = [o async for o in engine.generate("r", "a b c", params, resumed_samples=resumed(resume))]
        finally:
            await engine.shutdown()
        return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                for o in outputs if o.outputs]
    return asyncio.run(main())


def test_mock_engine_resume_holds_a_possible_stop_string_across_the_seam():
    # "tok3 tok4" could start the stop string "tok4 tok5 tok9": its text is held until tok5 ends the
    # match's chance; a resume after tok4 must release it then, exactly once.
    params = SamplingParams(max_tokens=8, stop=["tok4 tok5 tok9"])
    reference = _mock_run(params)
    text = "".join(t for _, t, _ in reference)
    assert text == " ".join(f"tok{i}" for i in range(8)) and reference[-1][2] == "length"
    for cut in range(1, len(reference)):  # at every chunk boundary (chunks may merge several steps)
        delivered = [i for ids, _, _ in reference[:cut] for i in ids]
        seen = "".join(t for _, t, _ in reference[:cut])
        resumed = _mock_run(params, delivered)
        assert [i for ids, _, _ in resumed for i in ids] == list(range(len(delivered), 8))
        assert seen + "".join(t for _, t, _ in resumed) == text, cut
        assert resumed[-1][2] == "length"
    assert any(ids[-1] in (4, 5) for ids, _, _ in reference[:-1])  # a seam fell where text is held
