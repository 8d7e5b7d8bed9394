"""`scalellm serve` with two replicas of 2 tensor-parallel ranks each (a tiny random Llama, fp32, gloo),
through the official openai client: greedy parity with transformers, a killed rank restarts its
replica, and SIGTERM leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import psutil
import pytest
from transformers import AutoTokenizer

from scalellm.process import free_ports
from tests.engine.tiny_models import hf_greedy, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROMPTS = [[1, 400, 2900, 77], list(range(300, 340)), [9000]]
NUM_TOKENS = 12
WORKER = "scalellm.engine.parallel.worker"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp("tp-llama"))
    model = make_tiny_model("llama", directory, tokenizer_dir)
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "scalellm.cli", "serve", directory, "--tensor-parallel-size", "2", "--replicas", "2",
         "--dtype", "float32", "--kv-cache-gib", "0.01", "--port", str(port), "--health-interval", "0.5",
         "--no-request-log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = process.stdout.readline()
    if "ScaleLLM serving" not in banner:
        process.kill()
        raise AssertionError(f"serve did not start (exit code {process.wait()}): {banner!r}")
    expected = [AutoTokenizer.from_pretrained(directory).decode(hf_greedy(model, p, NUM_TOKENS),
                                                                 skip_special_tokens=True) for p in PROMPTS]
    yield process, port, os.path.basename(directory), expected
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def complete_all(port: int, model: str) -> list[str]:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = []
    for prompt in PROMPTS:
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=NUM_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == NUM_TOKENS
        texts.append(reply.choices[0].text)
    return texts


def replicas_and_workers(serve: subprocess.Popen) -> list[tuple[psutil.Process, psutil.Process]]:
    """Each live replica of the server with its one worker rank."""
    pairs = []
    for replica in psutil.Process(serve.pid).children():
        if "replica" in replica.cmdline() and replica.status() != psutil.STATUS_ZOMBIE:
            (worker,) = [p for p in replica.children() if WORKER in " ".join(p.cmdline())]
            pairs.append((replica, worker))
    return pairs


def healthy_replicas(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(v) for v in re.findall(r"^scalellm:gateway_replica_healthy(?:{[^}]*})? (\S+)$", text, re.M))


def test_greedy_parity_through_the_openai_client(served):
    _, port, model, expected = served
    assert complete_all(port, model) == expected


def test_a_killed_rank_restarts_its_replica(served):
    serve, port, model, expected = served
    pairs = replicas_and_workers(serve)
    assert len(pairs) == 2
    replica, worker = pairs[0]
    worker.kill()
    assert replica.wait(30) != 0  # the replica exits non-zero when a rank dies...
    assert complete_all(port, model) == expected  # (the other replica serves meanwhile)
    deadline = time.monotonic() + 120
    while True:  # ...and the supervisor starts a new one, with its own worker
        try:
            pids = [r.pid for r, _ in replicas_and_workers(serve)]
            if len(pids) == 2 and replica.pid not in pids and healthy_replicas(port) == 2:
                break
        except (ValueError, psutil.NoSuchProcess, OSError):
            pass
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.5)
    assert complete_all(port, model) == expected


def test_sigterm_leaves_no_process(served):
    serve, _, _, _ = served
    descendants = psutil.Process(serve.pid).children(recursive=True)
    assert any(WORKER in " ".join(p.cmdline()) for p in descendants)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(60) == 0
    gone, alive = psutil.wait_procs(descendants, timeout=10)
    assert alive == []
