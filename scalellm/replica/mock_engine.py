"""The mock engine: the real engine (AsyncLLM, with its scheduler, KV cache and output processing) over
a fake model that makes up tokens on a fixed cadence (scalellm/engine/fake_model.py describes them).

`scalellm replica --engine mock --tpot-ms 5` serves it; tests and the gateway benchmarks use it to
measure and test everything around the model with the engine's own request semantics.
"""

from __future__ import annotations

from scalellm.config import EngineConfig
from scalellm.engine.async_llm import AsyncLLM
from scalellm.engine.fake_model import FakeModelFiles


class MockEngine(AsyncLLM):
    """AsyncLLM over the fake model `model_name`: one step every `tpot_ms`, `ttft_ms` more for a step
    that prefills; `engine` holds further EngineConfig fields (max_num_batched_tokens, ...)."""

    def __init__(self, model_name: str = "mock", *, tpot_ms: float = 5.0, ttft_ms: float = 0.0,
                 max_model_len: int | None = None, max_num_seqs: int = 128, **engine) -> None:
        files = FakeModelFiles(model_name, tpot_ms=tpot_ms, ttft_ms=ttft_ms, max_model_len=max_model_len)
        # Every unknown word is the same token to the fake tokenizer: a prefix cache would match them all.
        config = EngineConfig(model=model_name, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                              enable_prefix_caching=False, **engine)
        super().__init__(config, files)
