"""Real GGUF models, token for token against Hugging Face transformers.

The reference is transformers (fp32) loading the same GGUF file (`from_pretrained(dir, gguf_file=...)`:
it dequantizes with the same gguf-py code, maps llama.cpp's names back, and for Gemma 3 subtracts
the 1 llama.cpp's converter adds to norm weights). Both sides get the same prompt token ids (ours,
from transformers' own GGUF tokenizer conversion), so the comparison is of the models alone; the
tokenizer conventions (BOS as the file says) are checked on their own.

Models come from the shared fetch script (../shared/models/fetch.sh, instant when cached). Each
model is loaded once per module: transformers first (its tokens computed, then freed), then ours;
transformers' tokens are read from transformers_reference.json instead when it was recorded from the
same file, transformers version and prompt ids (transformers_reference.py).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess

import pytest

from scalellm import LLM
from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.loader.gguf_tokenizer import load_gguf_tokenizer
from scalellm.protocol.types import ChatPrompt, SamplingParams
from tests.engine.transformers_reference import reference

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FETCH = os.path.join(os.path.dirname(REPO), "shared", "models", "fetch.sh")
NUM_TOKENS = 16
PROMPTS = ["The capital of France is", "def quicksort(items):\n", "Water boils at a temperature of"]
SERVED = "qwen2.5-coder-0.5b"
"""The model test_serve_chat_matches_transformers serves (chat with the file's own template)."""
CHAT_QUESTIONS = ["Write a Python function that returns the square of a number.", "What is 2 + 2?"]
CHAT_REFERENCE: dict = {}
MODELS = {  # name -> (architecture, whether the file asks for BOS)
    "qwen2.5-coder-0.5b": ("qwen2", False),
    "qwen2.5-coder-1.5b": ("qwen2", False),
    "gemma-3-270m": ("gemma3", True),
}


def fetch(name: str) -> str:
    if not os.path.isfile(FETCH):
        pytest.skip(f"{FETCH} is absent: the real models come from the shared fetch script")
    return subprocess.run([FETCH, name], check=True, capture_output=True, text=True).stdout.strip()


def model_inputs(name: str):
    """(path, tokenizer, prompt ids, chat prompt ids) of a model's parity tests."""
    path = fetch(name)
    tokenizer = load_gguf_tokenizer(path, None)  # the file's template comes with transformers' conversion
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    chats = [chat_ids(tokenizer, q) for q in CHAT_QUESTIONS] if name == SERVED else []
    return path, tokenizer, prompts, chats


@pytest.fixture(scope="module", params=sorted(MODELS))
def real(request):
    """(name, our LLM, prompt ids, transformers' tokens per prompt); for the model served in
    test_serve_chat_matches_transformers, CHAT_REFERENCE gets transformers' chat replies."""
    name = request.param
    path, tokenizer, prompts, chats = model_inputs(name)
    expected, chat_replies = reference(name, path, prompts, NUM_TOKENS, chats, tokenizer.eos_token_id)
    if name == SERVED:
        CHAT_REFERENCE.update(path=path, ids=chats, replies=chat_replies, tokenizer=tokenizer)
    # quantization="none": the reference runs on dequantized fp32 weights ("auto" keeps GGUF codes)
    llm = LLM(path, dtype="float32", kv_cache_gib=0.25, max_model_len=4096, quantization="none")
    yield name, llm, prompts, expected
    del llm
    gc.collect()


def chat_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"]


def test_config_and_bos(real):
    name, llm, prompts, _ = real
    architecture, add_bos = MODELS[name]
    assert llm.engine.core.files.config.architecture == architecture
    bos = llm.get_tokenizer().bos_token_id
    assert all((p[0] == bos) == add_bos for p in prompts)


def test_greedy_batch_matches_transformers(real):
    _, llm, prompts, expected = real
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_greedy_staggered_chunked_matches_transformers(real):
    """A new request every 3 steps, prefills cut into chunks of 5 tokens among running decodes."""
    _, llm, prompts, expected = real
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    scheduler = engine.core.scheduler
    config = scheduler.config
    scheduler.config = dataclasses.replace(config, max_num_batched_tokens=5)
    try:
        got = run_staggered(engine, prompts, params, every=3)
    finally:
        scheduler.config = config
    assert got == expected


def run_staggered(engine, prompts, params, every: int) -> list[list[int]]:
    pending, results, step = list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            index, prompt = pending.pop(0)
            engine.add_request(f"staggered-{index}", prompt, params)
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        step += 1
    return [results[f"staggered-{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("real", [SERVED], indirect=True)
def test_serve_chat_matches_transformers(real):
    """`scalellm serve` (gateway + one replica) answers chat with the file's template, greedy replies
    equal transformers' (stopping at the same EOS), through the official openai client; a prompt
    longer than the context is a 400."""
    import openai

    from tests.reliability.procs import Serve

    reference = CHAT_REFERENCE
    serve = Serve(reference["path"], "--replicas", "1", "--dtype", "float32", "--quantization", "none",
                  "--kv-cache-gib", "0.25", "--max-model-len", "4096", "--no-request-log", timeout_s=900)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve.port}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        model = client.models.list().data[0].id
        for question, ids, reply_ids in zip(CHAT_QUESTIONS, reference["ids"], reference["replies"]):
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=NUM_TOKENS,
                                                   messages=[{"role": "user", "content": question}])
            expected = reference["tokenizer"].decode(reply_ids, skip_special_tokens=True)
            assert reply.choices[0].message.content == expected
            assert reply.usage.prompt_tokens == len(ids)
        with pytest.raises(openai.BadRequestError, match="context"):  # 5,000 tokens against a 4,096 context
            client.completions.create(model=model, prompt=" hello" * 5000, max_tokens=1)
    finally:
        serve.stop()


def test_chat_template_renders_tools():
    """Qwen2.5-Coder's own template renders `tools` (its tools branch); Gemma 3 270M (base) has no
    template; a template that never reads `tools` refuses them."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    chat = ChatPrompt([{"role": "user", "content": "Weather in Paris?"}], True, tools=tools)
    qwen = load_gguf_tokenizer(fetch(SERVED), None)
    text = InputProcessor(qwen, 151936, 4096, ()).render_chat(chat)
    assert "<tools>" in text and '"name": "get_weather"' in text and text.endswith("<|im_start|>assistant\n")
    qwen.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot render tools"):
        InputProcessor(qwen, 151936, 4096, ()).render_chat(chat)
    gemma = load_gguf_tokenizer(fetch("gemma-3-270m"), None)
    with pytest.raises(ValueError, match="no chat template"):
        InputProcessor(gemma, 262144, 4096, ()).render_chat(chat)


def test_long_prompt_prefills_in_chunks_while_another_stream_decodes():
    """A 4,000-token prompt (default settings: GGUF codes kept) is served; while it is prefilled in
    chunks, a stream that was already decoding gets a token in every step. The 0.5B and 4,000 tokens
    keep the suite short (the 1.5B took three minutes here, the 0.5B over 8,000 tokens two); the code
    path is the same."""
    path = fetch("qwen2.5-coder-0.5b")
    llm = LLM(path, kv_cache_gib=1.0, max_model_len=8192)
    engine, tokenizer = llm.engine, llm.get_tokenizer()
    short = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine.add_request("short", "def add(a, b):", short, delta=True)
    engine.step()  # the short prompt's prefill: its first token
    text = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(1000))
    long_ids = tokenizer.encode(text)[:4000]
    assert len(long_ids) == 4000
    engine.add_request("long", long_ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), delta=True)
    num_long_tokens, short_per_prefill_step = 0, []
    while engine.has_unfinished_requests():
        new = {o.request_id: len(o.outputs[0].token_ids) for o in engine.step()}
        if num_long_tokens == 0:
            short_per_prefill_step.append(new.get("short", 0))
        num_long_tokens += new.get("long", 0)
    budget = engine.core.scheduler.config.max_num_batched_tokens
    assert num_long_tokens == 2
    assert len(short_per_prefill_step) >= 4000 // budget  # the prompt went in chunks of at most the budget
    assert short_per_prefill_step[:39] == [1] * min(39, len(short_per_prefill_step))  # a token every step
