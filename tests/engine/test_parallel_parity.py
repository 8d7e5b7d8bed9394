"""Greedy parity with transformers (fp32) for tiny random Llama, Mixtral and Qwen2-MoE models at tensor
parallel sizes 1 and 2 and with expert parallelism on 2 ranks: gloo on the CPU, worker processes.

Each engine serves 8 prompts arriving one every 2 steps, with chunked prefill, prefix-cache hits and
preemption (a KV cache too small for all of them), so the per-step diffs carry new, continuing,
preempted and finished requests.
"""

from __future__ import annotations

import pytest
import torch

from scalellm import LLM
from scalellm.config import EngineConfig
from scalellm.engine.layers.partition import max_local_kv_heads
from scalellm.engine.loader.hf import HFDirectoryFiles
from tests.engine.test_parity_tiny import NUM_TOKENS, make_prompts, run_engine
from tests.engine.tiny_models import hf_greedy, make_tiny_model

pytestmark = pytest.mark.timeout(300)

LAYOUTS = {
    "tp1": dict(tensor_parallel_size=1),
    "tp2": dict(tensor_parallel_size=2),
    "ep2": dict(tensor_parallel_size=2, enable_expert_parallel=True),
}
CASES = [("llama", "tp2"), ("llama-uneven-heads", "tp2"), ("mixtral", "tp1"), ("mixtral", "tp2"),
         ("mixtral", "ep2"), ("qwen2-moe", "ep2")]
NUM_BLOCKS = 24
"""Of 4 tokens: the longest request (76 tokens) fits alone, not all of them at once."""


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_dir):
    """kind -> (model directory, prompts, transformers' greedy tokens), each built once."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            directory = str(tmp_path_factory.mktemp(kind))
            model = make_tiny_model(kind, directory, tokenizer_dir)
            prompts = make_prompts()
            cache[kind] = directory, prompts, [hf_greedy(model, p, NUM_TOKENS) for p in prompts]
        return cache[kind]

    return get


def kv_cache_gib(directory: str, tensor_parallel_size: int, num_blocks: int, block_size: int) -> float:
    """The per-rank budget that holds exactly num_blocks blocks (fp32)."""
    c = HFDirectoryFiles(directory).config
    kv_heads = max_local_kv_heads(c.num_heads, c.num_kv_heads, tensor_parallel_size)
    return num_blocks * 2 * c.num_layers * block_size * kv_heads * c.head_dim * 4 / (1 << 30)


@pytest.mark.parametrize("kind,layout", CASES, ids=[f"{k}-{layout}" for k, layout in CASES])
def test_greedy_parity_with_transformers(references, kind, layout):
    directory, prompts, expected = references(kind)
    parallel = LAYOUTS[layout]
    config = EngineConfig(model=directory, dtype="float32", block_size=4, max_num_batched_tokens=16,
                          kv_cache_gib=kv_cache_gib(directory, parallel["tensor_parallel_size"], NUM_BLOCKS, 4),
                          **parallel)
    engine = None
    try:
        got, engine = run_engine(config, prompts, stagger=2)
        load = engine.core.load()
    finally:
        if engine is not None:
            engine.core.shutdown()
    assert got == expected
    assert load.num_preemptions > 0 and load.prefix_cache_hit_tokens > 0
    assert load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS


def test_scores_and_int8_at_two_ranks(references):
    """Scoring runs on every rank; int8 on sharded weights stays close to fp32."""
    directory, prompts, _ = references("llama")
    tokens = prompts[4]
    fp32 = LLM(directory, dtype="float32", kv_cache_gib=0.01).engine.core.executor.score(tokens)
    with LLM(directory, dtype="float32", kv_cache_gib=0.01, tensor_parallel_size=2) as llm:
        assert torch.allclose(llm.engine.core.executor.score(tokens), fp32, atol=1e-4)
    with LLM(directory, dtype="float32", kv_cache_gib=0.01, quantization="int8", tensor_parallel_size=2) as llm:
        int8 = llm.engine.core.executor.score(tokens)
    # measured: mean |error| 0.012 (0.011 unsharded) against mean |log p| 11
    assert (int8 - fp32).abs().mean() < 0.005 * fp32.abs().mean()
