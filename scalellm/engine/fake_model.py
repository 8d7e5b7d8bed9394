"""A fake model: no weights, tokens on a fixed cadence, under the real scheduler, KV cache and output
processing, to measure and test everything around the model.

`scalellm replica --engine mock --tpot-ms 5` serves it (the mock engine): the real engine (AsyncLLM)
over FakeModelFiles, whose executor computes nothing. So requests mean what they mean on the real engine (admission,
max_tokens capping against the context, stop strings and stop token ids, n, logprobs, preemption,
aborts), because the same code handles them; only the tokens and the time are made up:

  * tokenizer: one token per whitespace-separated word ("<unk>" for any word not "tokK"); a chat
    renders as "<role> content ... <assistant>" (with tools, "<tools> N" first). Output token K of a sample is "tokK" (id K), so a
    reply reads "tok0 tok1 tok2 ...". There is no EOS.
  * time: the executor steps every `tpot_ms` on a fixed cadence (epoch + k * tpot, so the outputs of
    concurrent requests come out together, as a real batch's do); a step that prefills a request
    also waits `ttft_ms`. A prompt longer than a step's token budget takes several steps, as it would.
  * logprobs: the chosen token at rank 1 with logprob -0.5, alternatives "tokK+1", ... below it.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Iterator

import torch

from scalellm.config import EngineConfig
from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.loader.model_config import ModelConfig
from scalellm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from scalellm.engine.parallel.executor import Executor
from scalellm.protocol.types import Logprob

VOCAB_SIZE = 32000
DEFAULT_MAX_MODEL_LEN = 4096
UNKNOWN_TOKEN = "<unk>"
CHAT_TEMPLATE = ("{% if tools %}<tools> {{ tools | length }} {% endif %}"
                 "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] or '' }} "
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
"""Like a real template: a role marker before each message and one for the reply; tools become one
marker and their count."""


class FakeModelFiles(ModelFiles):
    """A model named `name` with no weights, the fake tokenizer, and a FakeExecutor stepping every
    `tpot_ms` (plus `ttft_ms` for a step that prefills); its context is `max_model_len` tokens."""

    def __init__(self, name: str, *, tpot_ms: float, ttft_ms: float = 0.0, max_model_len: int | None = None) -> None:
        if tpot_ms < 0 or ttft_ms < 0:
            raise ValueError(f"tpot_ms and ttft_ms must be >= 0, got {tpot_ms} and {ttft_ms}")
        self.name = name
        self.tpot_ms, self.ttft_ms = tpot_ms, ttft_ms
        self.config = ModelConfig(
            architecture="FakeModel", vocab_size=VOCAB_SIZE, hidden_size=1, intermediate_size=1, num_layers=1,
            num_heads=1, num_kv_heads=1, head_dim=1, rms_norm_eps=1e-6, rope_theta=1.0,
            max_position_embeddings=max_model_len or DEFAULT_MAX_MODEL_LEN, tie_word_embeddings=False)

    def iter_weights(self, keep_quantized: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def load_tokenizer(self):
        return fake_tokenizer()

    def make_executor(self, config: EngineConfig, max_model_len: int) -> "FakeExecutor":
        """The executor: as many KV blocks as `max_num_seqs` requests of the whole context need."""
        num_blocks = config.max_num_seqs * -(-max_model_len // config.block_size)
        return FakeExecutor(num_blocks, self.tpot_ms, self.ttft_ms)


def fake_tokenizer():
    """A transformers fast tokenizer: words "tok0".."tokN" are ids 0..N, any other word is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"tok{i}": i for i in range(VOCAB_SIZE - 1)}
    vocab[UNKNOWN_TOKEN] = VOCAB_SIZE - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNKNOWN_TOKEN)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


class FakeExecutor(Executor):
    """Steps on a fixed cadence; the token drawn for a sample is its number of output tokens so far."""

    def __init__(self, num_blocks: int, tpot_ms: float, ttft_ms: float = 0.0) -> None:
        self.num_blocks = num_blocks
        self.weights = "fake model, no weights"
        self.kv_dtype = torch.float32  # sizes the error message of a max_model_len past the blocks
        self._tpot_s = tpot_ms / 1000.0
        self._ttft_s = ttft_ms / 1000.0
        self._epoch = time.monotonic()
        self._last_step = -math.inf

    def execute(self, scheduled: SchedulerOutput, between_layers: Callable[[], None] | None = None
                ) -> ModelRunnerOutput:
        prefills = any(chunk.num_new_tokens > 1 or chunk.start_position == 0 for chunk in scheduled.chunks)
        self._wait_for_step(self._ttft_s if prefills else 0.0)
        output = ModelRunnerOutput()
        for chunk in scheduled.chunks:
            if not chunk.needs_sample:
                continue
            request = chunk.request
            token_id = len(request.output_token_ids) % (VOCAB_SIZE - 1)
            output.sampled_token_ids[request.request_id] = token_id
            num_logprobs = request.sampling_params.logprobs
            if num_logprobs is not None:
                output.logprobs[request.request_id] = _fake_logprobs(token_id, num_logprobs)
        return output

    def _wait_for_step(self, extra_s: float) -> None:
        """Sleep until the first cadence tick after the previous step and `extra_s` from now."""
        now = time.monotonic()
        due = max(now + extra_s, self._last_step + self._tpot_s)
        if self._tpot_s > 0:
            due = self._epoch + math.ceil((due - self._epoch) / self._tpot_s - 1e-6) * self._tpot_s
        if due > now:
            time.sleep(due - now)
        self._last_step = max(due, now)

    def release(self, request_ids: Iterable[str]) -> None:
        pass

    def score(self, token_ids: list[int]) -> torch.Tensor:
        raise NotImplementedError("the fake model has no probabilities to score with")

    def check_alive(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def _fake_logprobs(token_id: int, num_alternatives: int) -> dict[int, Logprob]:
    entries = {token_id: Logprob(-0.5, 1)}
    for rank in range(2, num_alternatives + 2):
        entries[(token_id + rank - 1) % (VOCAB_SIZE - 1)] = Logprob(-0.5 - rank, rank)
    return entries
