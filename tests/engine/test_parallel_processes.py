"""Worker processes: a rank that dies fails the engine with the cause, in a step or while idle, and no
worker outlives its engine (clean shutdown or failure)."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from scalellm import LLM
from scalellm.config import EngineConfig
from scalellm.engine.async_llm import AsyncLLM, EngineDeadError
from scalellm.engine.parallel.executor import WorkerDiedError
from scalellm.protocol.types import SamplingParams
from tests.engine.tiny_models import make_tiny_model

pytestmark = pytest.mark.timeout(180)

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir) -> str:
    directory = str(tmp_path_factory.mktemp("llama"))
    make_tiny_model("llama", directory, tokenizer_dir)
    return directory


def workers_of(executor) -> list[psutil.Process]:
    return [psutil.Process(worker.process.pid) for worker in executor.workers]


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_stops_every_worker(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_gib=0.01, tensor_parallel_size=2)
    executor = llm.engine.core.executor
    workers = workers_of(executor)
    assert len(workers) == 1 and all(running(w) for w in workers)
    assert len(llm.generate([1, 2, 3], GREEDY)[0].outputs[0].token_ids) == 8
    llm.shutdown()
    assert not any(running(w) for w in workers)
    assert [w.process.returncode for w in executor.workers] == [0]  # returned on the shutdown message
    assert not any(p.pid in {w.pid for w in workers} for p in psutil.Process().children(recursive=True))


def test_worker_killed_mid_generation_fails_the_engine(llama_dir):
    llm = LLM(llama_dir, dtype="float32", kv_cache_gib=0.01, tensor_parallel_size=2)
    engine = llm.engine
    (victim,) = workers_of(engine.core.executor)
    for i in range(4):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for _ in range(3):
        engine.step()
    victim.kill()
    engine.core.executor.workers[0].process.wait(10)  # reaped by its owner, which reads its exit code
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
        for _ in range(100):
            engine.step()
    with pytest.raises(WorkerDiedError):
        llm.generate([1, 2, 3], GREEDY)
    llm.shutdown()
    assert not running(victim)


def test_idle_engine_learns_of_a_dead_worker_at_once(llama_dir):
    """The replica's engine: asleep with no work, it fails as soon as a worker exits."""

    async def scenario():
        engine = AsyncLLM(EngineConfig(model=llama_dir, dtype="float32", kv_cache_gib=0.01, tensor_parallel_size=2))
        await engine.start()
        try:
            async for _ in engine.generate("a", [1, 2, 3], GREEDY):
                pass
            (victim,) = worker_processes()
            victim.kill()
            error = await asyncio.wait_for(engine.wait_failed(), 10)
            health = engine.health()
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate("b", [1, 2, 3], GREEDY):
                    pass
        finally:
            await engine.shutdown()
        return error, health, victim

    error, health, victim = asyncio.run(scenario())
    assert isinstance(error, WorkerDiedError) and "exited with code -9" in str(error)
    assert not health.healthy and "exited with code -9" in health.detail
    assert not running(victim) and worker_processes() == []


def worker_processes() -> list[psutil.Process]:
    """This process's live worker-rank children."""
    return [p for p in psutil.Process().children()
            if running(p) and "scalellm.engine.parallel.worker" in " ".join(p.cmdline())]
