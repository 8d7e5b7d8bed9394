"""The fused decode layers (one C++ op for a decode-only step), in float32 and bfloat16, give bit for bit
what the Python layers give: the same tokens and the same logprobs, over steps that mix decodes and prefill chunks."""

from __future__ import annotations

import random

import pytest

from scalellm.config import EngineConfig
from scalellm.engine.layers.kernels import kernel_load_error, load_decode_layers
from scalellm.engine.llm_engine import LLMEngine
from scalellm.engine.loader import default_model_path
from scalellm.engine.quantization.gguf import kernel_op
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import VOCAB_SIZE, make_tiny_model

pytestmark = pytest.mark.skipif(load_decode_layers() is None,
                                reason=f"decode_layers kernel unavailable: {kernel_load_error('decode_layers')}")


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (1, 4, 19, 40, 70, 7)]


def run(model_dir: str, quantization: str | None, fused: bool, dtype: str = "bfloat16", **config) -> tuple[list, int]:
    """(per request: token ids and logprobs, number of steps the fused op ran); a request arrives every
    third step, so steps alternate between decode-only and mixed."""
    engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, quantization=quantization,
                                    fused_decode=fused, kv_cache_gib=0.01, block_size=16,
                                    max_num_batched_tokens=32, **config))
    model = engine.core.executor.runner.model
    calls = 0
    if fused:
        fused_layers = model.fused_decode
        assert fused_layers is not None, "the fused decode layers should apply to this model"
        op = fused_layers.op

        def counting_op(*args):
            nonlocal calls
            calls += 1
            return op(*args)
        fused_layers.op = counting_op
    else:
        assert model.fused_decode is None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    pending, results, step = list(enumerate(prompts())), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, params)
        for output in engine.step():
            if output.finished:
                sample = output.outputs[0]
                results[output.request_id] = (sample.token_ids, sample.logprobs)
        step += 1
    return [results[str(i)] for i in range(len(prompts()))], calls


@pytest.mark.parametrize("kind,quantization,dtype,kv_cache_dtype", [
    ("llama", None, "bfloat16", "auto"), ("llama", "int8", "bfloat16", "auto"), ("llama", None, "float32", "auto"),
    ("llama", None, "float32", "bfloat16"),  # a bfloat16 cache under float32: K and V rounded as they are stored
    ("qwen2", None, "bfloat16", "auto"), ("qwen2", "int8", "bfloat16", "auto"),
    ("qwen2", "int8", "float32", "auto"),  # int8 weights under float32: a bfloat16 cache by default
    ("llama3-rope", None, "bfloat16", "auto"), ("llama3-rope", "int8", "bfloat16", "auto"),
    ("llama3-rope", None, "float32", "auto"),
])
def test_fused_decode_equals_the_python_layers(kind, quantization, dtype, kv_cache_dtype, tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / kind)
    make_tiny_model(kind, model_dir, tokenizer_dir)
    expected, _ = run(model_dir, quantization, fused=False, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    got, calls = run(model_dir, quantization, fused=True, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    assert calls > 10, "decode-only steps should have run through the fused op"
    for want, have in zip(expected, got):
        assert have[0] == want[0]
        assert have[1] == want[1]  # logprobs equal exactly: the same bits all the way to the logits


@pytest.mark.slow
@pytest.mark.skipif(kernel_op() is None, reason="the quantized kernel needs AVX512-VNNI or AVX2")
def test_fused_decode_equals_the_python_layers_on_gguf_weights():
    """The default model on its own Q4_1 weights, in the dtype it is served in here: the fused op calls the
    quantized kernel as the layers do."""
    path = default_model_path()
    expected, _ = run(path, "gguf", fused=False, dtype="auto")
    got, calls = run(path, "gguf", fused=True, dtype="auto")
    assert calls > 10
    assert got == expected


def test_fused_decode_does_not_apply_where_the_op_cannot_run(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "llama")
    make_tiny_model("llama", model_dir, tokenizer_dir)
    for config in (dict(dtype="float16"), dict(dtype="bfloat16", attention_backend="torch")):
        engine = LLMEngine(EngineConfig(model=model_dir, kv_cache_gib=0.01, **config))
        assert engine.core.executor.runner.model.fused_decode is None, config
    moe_dir = str(tmp_path / "mixtral")
    make_tiny_model("mixtral", moe_dir, tokenizer_dir)
    engine = LLMEngine(EngineConfig(model=moe_dir, dtype="bfloat16", kv_cache_gib=0.01))
    assert engine.core.executor.runner.model.fused_decode is None


def test_the_kv_cache_dtype_follows_the_weights(tmp_path, tokenizer_dir):
    model_dir = str(tmp_path / "llama")
    make_tiny_model("llama", model_dir, tokenizer_dir)
    for quantization, kv_cache_dtype, expected in (("int8", "auto", "bfloat16"), (None, "auto", "float32"),
                                                   ("int8", "float32", "float32")):
        engine = LLMEngine(EngineConfig(model=model_dir, dtype="float32", quantization=quantization,
                                        kv_cache_dtype=kv_cache_dtype, kv_cache_gib=0.01))
        runner = engine.core.executor.runner
        assert {str(k.dtype) for k, _ in runner.kv_caches} == {f"torch.{expected}"}
        assert runner.weights.endswith(f"kv cache {expected}")
