"""Sampling features through the whole engine, against independently computed references."""

from __future__ import annotations

import pytest
import torch

from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import hf_greedy, make_tiny_model

PROMPT = [5, 100, 2000, 300, 41, 7777, 12]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp("llama-sampling"))
    model = make_tiny_model("llama", directory, tokenizer_dir, seed=0)
    engine = LLMEngine(EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01, block_size=4))
    return model, engine


def run(engine: LLMEngine, requests: dict[str, tuple[list[int] | str, SamplingParams]]):
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
    return results


def test_seeded_sampling_same_whatever_the_batch(tiny):
    _, engine = tiny
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = run(engine, {"a": (PROMPT, params)})["a"].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    crowd = {f"n{i}": ([9, 8, 7 + i] * (i + 1), noise) for i in range(5)}
    crowd["a"] = (PROMPT, params)
    together = run(engine, crowd)["a"].outputs[0].token_ids
    assert alone == together
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True)
    assert run(engine, {"b": (PROMPT, other_seed)})["b"].outputs[0].token_ids != alone


def test_n_samples_share_prompt_blocks(tiny):
    model, engine = tiny
    before = engine.core.load().prefix_cache_hit_tokens
    greedy = SamplingParams(temperature=0, n=3, max_tokens=6, ignore_eos=True)
    long_prompt = PROMPT * 3  # 21 tokens: 5 full blocks of 4
    output = run(engine, {"n": (long_prompt, greedy)})["n"]
    assert [o.index for o in output.outputs] == [0, 1, 2]
    expected = hf_greedy(model, long_prompt, 6)
    assert all(o.token_ids == expected for o in output.outputs)
    assert engine.core.load().prefix_cache_hit_tokens - before >= 2 * 20
    sampled = SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=8, ignore_eos=True)
    a, b = run(engine, {"s": (PROMPT, sampled)})["s"].outputs
    assert a.token_ids != b.token_ids


def test_logprobs_match_transformers(tiny):
    model, engine = tiny
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    output = run(engine, {"l": (PROMPT, params)})["l"].outputs[0]
    ids = PROMPT + output.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert len(output.logprobs) == 5
    total = 0.0
    for step, (token_id, entry) in enumerate(zip(output.token_ids, output.logprobs)):
        row = reference[len(PROMPT) - 1 + step]
        assert entry[token_id].rank == 1
        top = torch.topk(row, 3).indices.tolist()
        assert set(top) <= set(entry)
        for candidate, logprob in entry.items():
            assert logprob.logprob == pytest.approx(row[candidate].item(), abs=1e-4)
            assert logprob.decoded_token is not None
        total += row[token_id].item()
    assert output.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_repetition_penalty_matches_transformers(tiny):
    model, engine = tiny
    params = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.8, ignore_eos=True)
    ours = run(engine, {"r": (PROMPT, params)})["r"].outputs[0].token_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                             repetition_penalty=1.8, pad_token_id=0)
    assert ours == out[0, len(PROMPT):].tolist()
    assert ours != hf_greedy(model, PROMPT, 10)


def test_stop_string_trims_text(tiny):
    _, engine = tiny
    base = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    full = run(engine, {"f": (PROMPT, base)})["f"].outputs[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip(), "the tiny model's text should have a usable stop string"
    cut = full.text.index(stop)
    stopped = run(engine, {"s": (PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                        stop=[stop]))})["s"].outputs[0]
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    kept = run(engine, {"k": (PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop],
                                                     include_stop_str_in_output=True))})["k"].outputs[0]
    assert kept.text == full.text[:cut + len(stop)]


def test_stop_token_and_max_tokens(tiny):
    _, engine = tiny
    full = run(engine, {"f": (PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))})["f"]
    tokens = full.outputs[0].token_ids
    assert full.outputs[0].finish_reason == "length" and len(tokens) == 8
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    out = run(engine, {"t": (PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                                    stop_token_ids=[stop_id]))})["t"].outputs[0]
    assert out.token_ids == tokens[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_abort_frees_blocks(tiny):
    _, engine = tiny
    engine.add_request("x", PROMPT * 4, SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    final = engine.abort("x")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    load = engine.core.load()
    assert load.num_running == 0 and load.num_waiting == 0
    assert not engine.has_unfinished_requests()


def test_bad_input_is_a_value_error(tiny):
    _, engine = tiny
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [5] * 600, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", "", SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("vocab", [10 ** 9], SamplingParams())


def test_generation_config_eos_ids_end_generation(tiny, tmp_path):
    import json
    import shutil

    _, engine = tiny
    greedy = run(engine, {"g": (PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))})["g"]
    tokens = greedy.outputs[0].token_ids
    directory = tmp_path / "model"
    shutil.copytree(engine.config.model, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, tokens[2]]}))
    other = LLMEngine(EngineConfig(model=str(directory), dtype="float32", kv_cache_gib=0.01, block_size=4))
    out = run(other, {"e": (PROMPT, SamplingParams(temperature=0, max_tokens=8))})["e"].outputs[0]
    assert out.token_ids == tokens[:tokens.index(tokens[2]) + 1]
    assert out.finish_reason == "stop"
