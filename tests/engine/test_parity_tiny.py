"""Greedy parity with transformers (fp32) for tiny random models of every architecture, under
batching with staggered arrivals, chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import random

import pytest
import torch

from scalellm import LLM
from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import VARIANTS, VOCAB_SIZE, hf_greedy, make_tiny_model

NUM_TOKENS = 12


def make_prompts(seed: int = 0) -> list[list[int]]:
    """8 prompts of different lengths; three share a 40-token prefix (prefix-cache hits)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, VOCAB_SIZE) for _ in range(40)]
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (1, 5, 17, 33, 64)]
    prompts += [shared + [rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (3, 9, 20)]
    return prompts


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp(request.param))
    model = make_tiny_model(request.param, directory, tokenizer_dir)
    prompts = make_prompts()
    expected = [hf_greedy(model, p, NUM_TOKENS) for p in prompts]
    return directory, prompts, expected


def run_engine(config: EngineConfig, prompts, stagger: int = 0) -> tuple[list[list[int]], LLMEngine]:
    """Greedy tokens per prompt; with stagger > 0, a new request arrives every `stagger` steps."""
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    pending = list(enumerate(prompts))
    results: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (stagger == 0 or step % stagger == 0):
            batch = pending if stagger == 0 else pending[:1]
            for i, prompt in batch:
                engine.add_request(str(i), prompt, params)
            pending = pending[len(batch):]
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        step += 1
    return [results[str(i)] for i in range(len(prompts))], engine


def kv_block_budget(config: EngineConfig, num_rows: int) -> float:
    """kv_cache_gib holding num_rows blocks per KV group (kv_cache/groups.py) of the model, in fp32."""
    from scalellm.engine.kv_cache.groups import block_bytes, kv_groups
    from scalellm.engine.loader import open_model_files

    c = open_model_files(config.model).config
    groups = kv_groups(c)
    return num_rows * len(groups) * block_bytes(groups, config.block_size, c.num_kv_heads, c.head_dim,
                                                torch.float32) / (1 << 30)


def test_one_batch(tiny):
    directory, prompts, expected = tiny
    got, _ = run_engine(EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01), prompts)
    assert got == expected


def test_staggered_chunked_prefill(tiny):
    directory, prompts, expected = tiny
    config = EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01, max_num_batched_tokens=7)
    got, _ = run_engine(config, prompts, stagger=2)
    assert got == expected


def test_prefix_cache_hits(tiny):
    directory, prompts, expected = tiny
    config = EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01, block_size=8)
    got, engine = run_engine(config, prompts, stagger=3)
    assert got == expected
    hits = engine.core.load().prefix_cache_hit_tokens
    if engine.core.scheduler.kv_cache_manager.enable_prefix_caching:
        assert hits >= 2 * 40 // 8 * 8
    else:  # sliding-window KV groups (Gemma 3) release their old blocks: prefix caching is off
        assert hits == 0


def test_preemption_under_small_kv_budget(tiny):
    directory, prompts, expected = tiny
    probe = EngineConfig(model=directory, dtype="float32", block_size=4)
    # 20 rows of 4 tokens per KV group: the longest request (75 tokens of KV) fits alone, not all at once
    config = EngineConfig(model=directory, dtype="float32", block_size=4,
                          kv_cache_gib=kv_block_budget(probe, 20), enable_prefix_caching=False)
    got, engine = run_engine(config, prompts)
    assert got == expected
    load = engine.core.load()
    assert load.num_preemptions > 0
    assert load.num_free_blocks == load.num_total_blocks


def test_score_matches_transformers(tiny_scoring):
    """LLM.perplexity's scoring pass (one prefill over a private cache, sliding windows included)
    gives transformers' log-probabilities."""
    directory, model, tokens = tiny_scoring
    ours = LLM(directory, dtype="float32", kv_cache_gib=0.01).engine.core.executor.score(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens[1:])[:, None]).squeeze(1)
    assert torch.allclose(ours, expected, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_scoring(tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp("gemma3-score"))
    model = make_tiny_model("gemma3", directory, tokenizer_dir)
    return directory, model, make_prompts()[4]


def test_max_model_len_beyond_the_kv_cache_names_the_memory(tiny):
    directory, _, _ = tiny
    with pytest.raises(ValueError, match=r"max_model_len 512 needs 0\.\d+ GiB of KV cache for one request"):
        LLMEngine(EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.0001, max_model_len=512))
