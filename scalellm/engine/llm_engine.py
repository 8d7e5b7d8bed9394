"""The synchronous engine: input processing, the engine core and output processing in one loop."""

from __future__ import annotations

from typing import Sequence

from scalellm.config import EngineConfig
from scalellm.engine.engine_core import EngineCore
from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.output_processor import OutputProcessor
from scalellm.engine.request import RequestStatus
from scalellm.engine.structured import LazyGrammarCache, attach_grammars
from scalellm.protocol.types import PromptInput, RequestMetrics, RequestOutput, ResumedSample, SamplingParams


class LLMEngine:
    """add_request() any time, step() until no work is left; outputs come from step()."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.model_name = self.core.files.name
        self.max_model_len = self.core.max_model_len
        self.tokenizer = self.core.files.load_tokenizer()
        self.input_processor = InputProcessor.for_core(self.core, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.grammars = LazyGrammarCache.for_input_processor(self.input_processor)

    def add_request(self, request_id: str, prompt: PromptInput, params: SamplingParams,
                    metrics: RequestMetrics | None = None, delta: bool = False,
                    resumed_samples: Sequence[ResumedSample] = ()) -> int:
        """Validate, tokenize and queue a request; returns its number of prompt tokens.

        delta=True reports only what is new at each step; False reports the whole result once finished.
        resumed_samples: run only these samples, after the output already generated elsewhere (see
        InputProcessor.make_requests); the outputs then continue after it without repeating it.
        """
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in flight")
        prompt_token_ids = self.input_processor.tokenize(prompt)
        samples = self.input_processor.make_requests(request_id, prompt_token_ids, params,
                                                     resumed_samples=resumed_samples)
        if params.structured is not None:
            attach_grammars(samples, self.grammars.compile_blocking(params.structured))
        text = prompt if isinstance(prompt, str) else None
        self.output_processor.add_request(request_id, text, samples, metrics, delta)
        self.core.add_requests(samples)
        return len(prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request in any state, free its blocks; returns its final output (finish_reason "abort")."""
        sample_ids = self.output_processor.sample_ids(request_id)
        self.core.finish_requests(sample_ids, RequestStatus.FINISHED_ABORTED)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_work()

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        if processed.stopped_sample_ids:
            self.core.finish_requests(processed.stopped_sample_ids, RequestStatus.FINISHED_STOPPED)
        return processed.outputs
