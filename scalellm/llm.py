"""The offline API, shaped like vLLM's: LLM(...).generate(...) and .chat(...)."""

from __future__ import annotations

import itertools
from typing import Sequence

from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.protocol.types import ChatPrompt, PromptInput, RequestOutput, SamplingParams


class LLM:
    """Runs a model in this process (and, with tensor_parallel_size=N, in N-1 worker processes it
    starts; `shutdown()` or a `with` block stops them). Keyword arguments beyond the first ones go to
    EngineConfig, e.g. tensor_parallel_size=2, enable_expert_parallel=True."""

    def __init__(self, model: str | None = None, dtype: str = "auto", kv_cache_gib: float = 1.0,
                 max_model_len: int | None = None, **engine_kwargs) -> None:
        config = EngineConfig(model=model, dtype=dtype, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len,
                              **engine_kwargs)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); outputs in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Answer one conversation (a list of messages) or several (a list of such lists)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([ChatPrompt(c, add_generation_prompt) for c in conversations], sampling_params)

    def perplexity(self, text: str) -> float:
        """exp(mean negative log-likelihood) of the text's tokens under the model (a quality check)."""
        import math

        token_ids = self.engine.tokenizer.encode(text)
        logprobs = self.engine.core.executor.score(token_ids)
        return math.exp(-float(logprobs.mean()))

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor_parallel_size > 1); the LLM is unusable after."""
        self.engine.core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def _run(self, prompts: list[PromptInput], sampling_params) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        order = {}
        for prompt, params in zip(prompts, sampling_params):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, prompt, params)
            order[request_id] = len(order)
        results: list[RequestOutput | None] = [None] * len(order)
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished and output.request_id in order:
                    results[order[output.request_id]] = output
        return results
