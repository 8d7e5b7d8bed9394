"""`scalellm serve --engine mock` as a real process tree, called with the official openai client."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import openai
import psutil
import pytest

from scalellm.process import free_ports
from scalellm.protocol.types import SamplingParams
from scalellm.rpc.client import ReplicaClient, ReplicaError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def start_serve(*extra: str) -> tuple[subprocess.Popen, int, str]:
    """Start `scalellm serve` and wait for its banner; returns the process, its port and the banner."""
    port = free_ports(1)[0]
    process = subprocess.Popen(
        [sys.executable, "-m", "scalellm.cli", "serve", "--engine", "mock", "--tpot-ms", "1",
         "--port", str(port), "--drain-timeout", "2", "--health-interval", "0.5", "--no-request-log", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    banner = process.stdout.readline()
    if "ScaleLLM serving" not in banner:
        process.kill()
        raise AssertionError(f"serve did not start (exit code {process.wait()}): {banner!r}")
    return process, port, banner


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def replicas_of(process: subprocess.Popen) -> dict[str, psutil.Process]:
    """The live replica children by the port they listen on (a replica still starting has none yet)."""
    found = {}
    for child in psutil.Process(process.pid).children():
        if "replica" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
            ports = [str(c.laddr.port) for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            if ports:
                found[ports[0]] = child
    return found


@pytest.fixture(scope="module")
def serve():
    process, port, banner = start_serve("--replicas", "2", "--routing-policy", "round_robin")
    yield process, port, banner
    stop(process)


def openai_client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=20)


def test_banner(serve):
    _, port, banner = serve
    assert banner.strip() == f"ScaleLLM serving mock at http://127.0.0.1:{port} (2 replicas; fake model, no weights)"


def test_chat(serve):
    _, port, _ = serve
    response = openai_client(port).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello there"}], max_tokens=4)
    assert response.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 4)  # <user> hello there <assistant>


def test_chat_streamed(serve):
    _, port, _ = serve
    stream = openai_client(port).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_bad_request_is_a_400(serve):
    _, port, _ = serve
    with pytest.raises(openai.BadRequestError):
        openai_client(port).completions.create(model="mock", prompt="", max_tokens=2)


async def _generate_once(address: str) -> str:
    client = ReplicaClient(address)
    try:
        outputs = [o async for o in client.generate("direct", "x", SamplingParams(max_tokens=2), time.time())]
        return "".join(c.text for o in outputs for c in o.outputs)
    finally:
        await client.close()


def test_killed_replica_is_restarted_and_serves(serve):
    process, port, _ = serve
    before = replicas_of(process)
    killed_port, victim = sorted(before.items())[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    deadline = time.monotonic() + 30
    while True:
        replica = replicas_of(process).get(killed_port)
        if replica is not None and replica.pid != victim.pid:
            try:
                assert asyncio.run(_generate_once(f"127.0.0.1:{killed_port}")) == "tok0 tok1"
                break
            except ReplicaError:
                pass
        assert time.monotonic() < deadline, "the killed replica was not restarted"
        time.sleep(0.2)
    client = openai_client(port)
    for _ in range(4):  # round robin: both replicas serve through the gateway
        response = client.completions.create(model="mock", prompt="a b", max_tokens=2)
        assert response.choices[0].text == "tok0 tok1"


def test_sigterm_stops_everything(serve):
    process, _, _ = serve
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert len(descendants) >= 3
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    gone, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive, f"orphans left: {alive}"


def test_children_die_with_a_killed_supervisor():
    process, _, _ = start_serve("--replicas", "1")
    descendants = psutil.Process(process.pid).children(recursive=True)
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        gone, alive = psutil.wait_procs(descendants, timeout=15)
        assert not alive, f"orphans left: {alive}"
    finally:
        for child in descendants:
            if child.is_running():
                child.kill()


@pytest.fixture(scope="module")
def direct():
    process, port, banner = start_serve("--no-gateway", "--tpot-ms", "20")
    yield process, port, banner
    stop(process)


def test_no_gateway_is_one_process(direct):
    process, port, banner = direct
    assert banner.strip() == (f"ScaleLLM serving mock at http://127.0.0.1:{port} "
                              "(one process: engine in-process, no gRPC hop)")
    assert psutil.Process(process.pid).children(recursive=True) == []


def test_no_gateway_chat(direct):
    _, port, _ = direct
    response = openai_client(port).chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "hello there"}], max_tokens=3)
    assert response.choices[0].message.content == "tok0 tok1 tok2"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, 3)
    assert response.model_extra["scalellm_timings"]["replica_receive"] > 0


def test_no_gateway_streamed_with_usage(direct):
    _, port, _ = direct
    chunks = list(openai_client(port).completions.create(
        model="mock", prompt="a b", max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2"
    assert chunks[-1].usage.completion_tokens == 3
    timings = chunks[-1].model_extra["scalellm_timings"]
    assert 0 < timings["routed"] <= timings["replica_receive"] <= timings["last_token"] <= timings["gateway_send"]


def test_no_gateway_bad_request_is_a_400(direct):
    _, port, _ = direct
    with pytest.raises(openai.BadRequestError):
        openai_client(port).completions.create(model="mock", prompt="", max_tokens=2)


def test_no_gateway_sigterm_drains_the_stream_in_flight(direct):
    process, port, _ = direct
    stream = openai_client(port).completions.create(model="mock", prompt="a", max_tokens=10, stream=True)
    texts = [next(stream).choices[0].text]
    process.send_signal(signal.SIGTERM)
    texts += [c.choices[0].text for c in stream if c.choices]
    assert "".join(texts) == " ".join(f"tok{i}" for i in range(10))
    assert process.wait(30) == 0

