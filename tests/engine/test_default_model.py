"""The default model (SmolLM2-135M-Instruct from its GGUF) against transformers on the same weights."""

from __future__ import annotations


import pytest
import torch

from scalellm import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4, 5,",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "Translate to French: I like apples.",
    "Q: What is 12 times 12?\nA:",
    "The three primary colors are",
]
NUM_TOKENS = 16
BF16_LOGPROB_TOLERANCE = 0.35
"""Largest |logprob(bf16 engine) - logprob(fp32 transformers)| allowed over the top-5 next tokens."""


@pytest.fixture(scope="module")
def llm_fp32():
    return LLM(dtype="float32", quantization="none", max_num_batched_tokens=24, kv_cache_gib=0.05)


def hf_generate(model, ids: list[int], num_tokens: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=num_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist()


def test_chat_matches_transformers(hf_default_model, llm_fp32):
    model, tokenizer = hf_default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = llm_fp32.chat(messages, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    expected = hf_generate(model, ids["input_ids"], 16)
    assert ours.token_ids == expected
    assert ours.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in ours.text


def test_eight_prompts_batched_and_chunked(hf_default_model, llm_fp32):
    model, tokenizer = hf_default_model
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS)
    outputs = llm_fp32.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        expected = hf_generate(model, ids, NUM_TOKENS)
        assert output.outputs[0].token_ids == expected, prompt


def test_bf16_logprobs_within_tolerance(hf_default_model):
    model, tokenizer = hf_default_model
    llm = LLM(dtype="bfloat16", quantization="none", kv_cache_gib=0.05)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    for prompt in PROMPTS[:4]:
        output = llm.generate(prompt, params)[0].outputs[0]
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        for token_id, logprob in output.logprobs[0].items():
            assert abs(logprob.logprob - reference[token_id].item()) < BF16_LOGPROB_TOLERANCE, prompt
