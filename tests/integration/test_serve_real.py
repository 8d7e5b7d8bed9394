"""`scalellm serve` with the default model and two replicas, through the official openai client."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
import torch

from scalellm.process import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def serve():
    # quantization none: the parity test compares with transformers on the dequantized fp32 weights
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "scalellm.cli", "serve", "--replicas", "2", "--dtype", "float32", "--quantization", "none",
         "--kv-cache-gib", "0.25", "--port", str(port), "--health-interval", "0.5", "--no-request-log"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = process.stdout.readline()
    if "ScaleLLM serving" not in banner:
        process.kill()
        raise AssertionError(f"serve did not start (exit code {process.wait()}): {banner!r}")
    yield process, port
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def client_for(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(port: int, name: str) -> list[float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return [float(m) for m in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]


def test_chat_greedy_matches_transformers(serve, hf_default_model):
    _, port = serve
    model, tokenizer = hf_default_model
    client = client_for(port)
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == len(ids)


def test_streamed_equals_non_streamed_with_usage(serve):
    _, port = serve
    client = client_for(port)
    whole = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=20,
                                      temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_stop_and_logprobs(serve):
    _, port = serve
    client = client_for(port)
    two = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}],
                                         n=2, temperature=1.0, seed=7, max_tokens=8)
    assert [c.index for c in two.choices] == [0, 1]
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert " 6," in full.choices[0].text
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[" 6,"])
    assert stopped.choices[0].text == full.choices[0].text.split(" 6,")[0]
    assert stopped.choices[0].finish_reason == "stop"
    with_logprobs = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == with_logprobs.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)


def test_disconnect_mid_stream_frees_blocks(serve):
    _, port = serve
    client = client_for(port)
    stream = client.completions.create(model=MODEL, prompt="Tell me a long story.", max_tokens=2000,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while max(metric(port, "scalellm:num_requests_running") or [1]) > 0 or \
            max(metric(port, "scalellm:kv_cache_usage_perc") or [1]) > 0:
        assert time.monotonic() < deadline, "the aborted request kept its blocks"
        time.sleep(0.5)


def test_replica_killed_during_non_streamed_requests_loses_none(serve):
    process, port = serve
    client = client_for(port)
    replicas = [p for p in psutil.Process(process.pid).children() if "replica" in p.cmdline()]
    assert len(replicas) == 2

    def ask(i: int) -> str:
        reply = client.completions.create(model=MODEL, prompt=f"Count from {i}:", max_tokens=32,
                                          extra_body={"ignore_eos": True})
        return reply.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(16)]
        time.sleep(1.0)
        victim = replicas[0]
        victim.send_signal(signal.SIGKILL)
        results = [f.result() for f in futures]
    assert all(results)
    deadline = time.monotonic() + 120
    while True:  # the supervisor restarts it and it rejoins
        alive = [p for p in psutil.Process(process.pid).children() if "replica" in p.cmdline()
                 and p.status() != psutil.STATUS_ZOMBIE]
        if len(alive) == 2 and victim.pid not in [p.pid for p in alive] and \
                sum(metric(port, "scalellm:gateway_replica_healthy")) == 2:
            break
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(1)
    assert ask(0)
