"""Quality of the reduced-precision paths: perplexity on a fixed text against fp32's."""

from __future__ import annotations

import pytest

from scalellm import LLM

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines pushed along by the rider's feet. Pedals attached to the "
    "front wheel arrived a few decades later, and by the end of the century the safety bicycle, with "
    "two wheels of equal size and a chain driving the rear wheel, had taken the shape we still ride "
    "today. Cheap and reliable bicycles changed how people lived: workers could live farther from "
    "factories, women gained a new freedom of movement, and road surfaces improved because cyclists "
    "demanded better streets. Many of the engineering ideas that made bicycles light and strong, such "
    "as ball bearings, pneumatic tyres and tubular steel frames, later found their way into cars and "
    "aircraft."
)
INT8_MAX_RATIO = 1.08
"""int8 (W8A8 dynamic) perplexity may exceed fp32's by at most 8% (measured: 24.35 vs 23.01, +5.8%)."""
BF16_MAX_RATIO = 1.02
DEFAULT_MAX_RATIO = 1.02
"""The default (the GGUF's own Q4_1 weights in the quantized kernel, int8 activations per 32-block, bfloat16
elsewhere) against fp32 on the same dequantized weights (measured: 22.94 vs 23.01)."""


@pytest.fixture(scope="module")
def fp32_perplexity() -> float:
    return LLM(dtype="float32", quantization="none", kv_cache_gib=0.02).perplexity(TEXT)


def test_fp32_perplexity_is_sane(fp32_perplexity):
    assert 1.5 < fp32_perplexity < 40


def test_int8_perplexity_close_to_fp32(fp32_perplexity):
    int8 = LLM(dtype="float32", quantization="int8", kv_cache_gib=0.02).perplexity(TEXT)
    assert int8 / fp32_perplexity < INT8_MAX_RATIO, (int8, fp32_perplexity)


def test_bf16_perplexity_close_to_fp32(fp32_perplexity):
    bf16 = LLM(dtype="bfloat16", quantization="none", kv_cache_gib=0.02).perplexity(TEXT)
    assert bf16 / fp32_perplexity < BF16_MAX_RATIO, (bf16, fp32_perplexity)


def test_default_perplexity_close_to_fp32(fp32_perplexity):
    default = LLM(kv_cache_gib=0.02).perplexity(TEXT)
    assert default / fp32_perplexity < DEFAULT_MAX_RATIO, (default, fp32_perplexity)
