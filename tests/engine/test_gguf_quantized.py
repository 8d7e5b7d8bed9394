"""The default model served on its own GGUF quantization (quantization "auto" -> "gguf"): what is picked,
what it keeps resident, and greedy output against fp32 on the same dequantized weights."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader

from scalellm import LLM
from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.engine.loader import default_model_path
from scalellm.engine.quantization import kernel_isa
from scalellm.engine.quantization.gguf import kernel_op
from scalellm.protocol.types import SamplingParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(kernel_isa() is None or kernel_op() is None, reason="needs AVX512-VNNI or AVX2")]

PROMPTS = ["def fibonacci(n):", "The capital of France is", "Write a haiku about the sea."]
NUM_TOKENS = 24
TIE_MARGIN = 0.5
"""Greedy outputs may part only where fp32's two best tokens are within this many nats (measured: parting
at margins of 0.07, 0.22 and 0.06 nats; the kernel rounds activations to 8 bits per block of 32)."""
LOGPROB_TOLERANCE = 0.35
"""Largest |logprob difference| of a chosen token while the outputs agree (as for bfloat16)."""
MEMORY_RATIO = 1.35
"""Resident weight bytes over the file's tensor bytes. SmolLM2 ties its head to its Q8_0 embedding: the
file's blocks serve the lookup and a packed copy the head (30 MB twice); the rest is 1.0x (Q4_1 repacked)."""


def resident_bytes(module: torch.nn.Module) -> int:
    """Weight bytes: every parameter and buffer but the rotary tables, plus the embedding's file blocks."""
    rotary = {id(t) for t in module.rotary.buffers()}
    tensors = {id(t): t for t in list(module.parameters()) + list(module.buffers())
               if t is not None and id(t) not in rotary}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    embed = module.embed_tokens.gguf_weight
    return total + (embed.raw.nbytes if embed is not None else 0)


def test_default_keeps_the_files_quantization():
    engine = LLMEngine(EngineConfig(kv_cache_gib=0.01))
    runner = engine.core.executor.runner
    assert runner.quantization == "gguf"
    model = runner.model
    for layer in model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert linear.quantized_op is not None and linear.weight is None
    assert model.logits_head.quantized.quantized_op is not None
    assert model.fused_decode is not None  # decode steps run the quantized op inside the fused layers
    file_bytes = sum(int(t.n_bytes) for t in GGUFReader(default_model_path()).tensors)
    assert resident_bytes(model) < MEMORY_RATIO * file_bytes, (resident_bytes(model), file_bytes)


def test_none_keeps_the_dequantized_path():
    engine = LLMEngine(EngineConfig(kv_cache_gib=0.01, quantization="none"))
    assert engine.core.executor.runner.quantization == "none"
    assert engine.core.executor.runner.model.layers[0].self_attn.qkv_proj.weight is not None


def test_greedy_output_matches_fp32_up_to_near_ties():
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=2)
    ours = LLM(kv_cache_gib=0.02).generate(PROMPTS, params)
    reference = LLM(dtype="float32", quantization="none", kv_cache_gib=0.02).generate(PROMPTS, params)
    agreed = 0
    for mine, want in zip(ours, reference):
        mine, want = mine.outputs[0], want.outputs[0]
        for i, (token, expected) in enumerate(zip(mine.token_ids, want.token_ids)):
            if token != expected:
                top = sorted((lp.logprob for lp in want.logprobs[i].values()), reverse=True)
                assert top[0] - top[1] < TIE_MARGIN, (i, want.logprobs[i], mine.logprobs[i])
                assert token in want.logprobs[i]  # the runner-up of fp32
                break
            agreed += 1
            assert abs(mine.logprobs[i][token].logprob - want.logprobs[i][token].logprob) < LOGPROB_TOLERANCE
    assert agreed >= NUM_TOKENS  # at least one prompt's worth of tokens agree
