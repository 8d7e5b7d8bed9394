"""The project's own request and output types, shared by the engine, the replica and the gateway.

These are plain dataclasses: no torch, no protobuf. `replica/convert.py` is the only module that
maps them to and from the wire format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
MAX_PRIORITY = (1 << 31) - 1
"""Priorities travel as int32 to the replicas."""

STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "structural_tag")
"""What a StructuredOutput's spec is: a JSON Schema, any JSON object, a regex, a JSON list of
allowed strings, an EBNF grammar, or an xgrammar structural tag (JSON; tool calls use it)."""


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, enforced by token masks in the sampler."""

    kind: str
    """One of STRUCTURED_KINDS."""
    spec: str = ""
    """The kind's text: schema JSON, regex, choices JSON, EBNF or structural tag JSON ("" for json_object)."""

    def __post_init__(self) -> None:
        _check(self.kind in STRUCTURED_KINDS, f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}")
        _check(isinstance(self.spec, str), "structured output spec must be a string")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated at construction (`ValueError` on bad input)."""

    n: int = 1
    """Number of independent samples for the prompt; they share the prompt's KV blocks."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens already seen in the prompt or output (divides positive logits, multiplies negative)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the stop string itself is not returned (unless include_stop_str_in_output)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation, besides EOS."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to fix the output length)."""
    max_tokens: int | None = 16
    """Most tokens to generate per sample; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens were generated."""
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the chosen token's logprob plus the k most likely alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens (like <|im_end|>) out of the detokenized text."""
    structured: StructuredOutput | None = None
    """A grammar the output must follow (response_format, structured_outputs, forced tool calls)."""
    priority: int | None = None
    """Scheduling, not sampling: the request's place in the replica's waiting queue, lower first (vLLM's
    convention); a more urgent request may preempt a running less urgent one. None is 0, unless the
    gateway gives the API key's default."""

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self):
        """(condition, message when it is false), in order: a generator, so each condition is evaluated
        only when the ones before it held."""
        yield isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"
        yield _finite(self.temperature) and self.temperature >= 0, "temperature must be >= 0"
        yield _finite(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"
        yield isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be -1, 0 or a positive integer"
        yield _finite(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"
        yield _finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"
        yield (_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
               "presence_penalty must be in [-2, 2]")
        yield (_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
               "frequency_penalty must be in [-2, 2]")
        yield (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens must be an integer >= 1")
        yield isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens must be >= 0"
        yield (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= self.MAX_LOGPROBS),
               _LOGPROBS_RANGE)
        yield all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"
        yield (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers")
        yield self.seed is None or isinstance(self.seed, int), "seed must be an integer"
        yield (self.structured is None or isinstance(self.structured, StructuredOutput),
               "structured must be a StructuredOutput")
        yield (self.priority is None or (isinstance(self.priority, int)
                                         and -MAX_PRIORITY - 1 <= self.priority <= MAX_PRIORITY), _PRIORITY_RANGE)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_LOGPROBS_RANGE = f"logprobs must be between 0 and {SamplingParams.MAX_LOGPROBS}"
_PRIORITY_RANGE = f"priority must be an integer in [{-MAX_PRIORITY - 1}, {MAX_PRIORITY}]"


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ChatPrompt:
    """A chat conversation, turned into tokens by the replica's chat template."""

    messages: list[dict]
    """OpenAI-style messages: {"role": "system"|"user"|"assistant"|"tool", "content": str | [parts]};
    an assistant message may carry "tool_calls", a tool message "tool_call_id" (and "name")."""
    add_generation_prompt: bool = True
    """Append the assistant turn's opening so the model answers."""
    tools: list[dict] | None = None
    """OpenAI function tools ({"type": "function", "function": {...}}), rendered by the chat template."""


@dataclass
class InfillPrompt:
    """Fill in the middle: the text before and after the gap (the model's template must support it)."""

    prefix: str
    suffix: str


PromptInput = Union[str, list[int], ChatPrompt, InfillPrompt]
"""Text (tokenized as is), token ids (used as is), a chat conversation, or a fill-in-the-middle gap."""


@dataclass(frozen=True)
class ResumedSample:
    """One unfinished sample of a request that continues on another replica (failover): the engine
    runs it as sample `index` of the request's n, after the output another replica already delivered."""

    index: int
    """The sample's original index in 0 .. n-1 (its seeded draws and its outputs' `index` keep it)."""
    token_ids: tuple[int, ...] = ()
    """The output token ids already delivered; generation continues after them."""
    cumulative_logprob: float | None = None
    """The sum of the delivered tokens' logprobs, when it was reported; the sample's sum continues from it."""


@dataclass
class Logprob:
    """One token's log-probability under the model's raw distribution (before temperature and penalties)."""

    logprob: float
    rank: int
    """1 for the most likely token."""
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Stage timestamps of one request, wall-clock seconds (time.time()); 0.0 when not reached."""

    gateway_receive_time: float = 0.0
    """When the gateway received the HTTP request (sent over the wire by the gateway)."""
    replica_receive_time: float = 0.0
    """When the replica received the request, before tokenization."""
    queued_time: float = 0.0
    """When the tokenized request was handed to the engine's waiting queue."""
    scheduled_time: float = 0.0
    """When the scheduler first put the request in a batch."""
    first_token_time: float = 0.0
    """When the first output token was sampled."""
    last_token_time: float = 0.0
    """When the last output token was sampled."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    prefill_chunks: list[tuple[float, int]] | None = None
    """(scheduled time, tokens) of each prefill chunk of the first sample; the replica's own record
    (its trace spans), not sent to the gateway."""


@dataclass(slots=True)  # made per request and step on the replica and the gateway
class CompletionOutput:
    """One sample of a request. In a stream (delta mode) text, token_ids and logprobs are only the new part."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    """Per output token: the chosen token and the top alternatives, keyed by token id."""
    finish_reason: str | None = None
    """None while running, then "stop" (EOS, stop token or string), "length" or "abort"."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample, if any."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)  # made per request and step on the replica and the gateway
class RequestOutput:
    """What the engine reports about a request: the whole result, or in a stream one step's increment."""

    request_id: str
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    metrics: RequestMetrics | None = None
    """Filled on the last output of a request."""


@dataclass(frozen=True)
class EngineHealth:
    """Whether the engine can serve: its step loop is alive and made progress recently when it had work."""

    healthy: bool
    detail: str = ""


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot of the engine's load, for routing."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_tokens_in_flight: int
    """Prompt tokens still to prefill plus output tokens still to generate, over all requests."""
    prefix_cache_queried_tokens: int = 0
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_cache_hit_tokens: int = 0
    """Cumulative prompt tokens found there."""
    num_preemptions: int = 0
    """Cumulative requests preempted for lack of KV blocks."""
    num_requests_received: int = 0
    """Cumulative requests the replica received since it started (counted by its gRPC service)."""
    num_spans_dropped: int = 0
    """Cumulative trace spans the replica could not export (counted by its gRPC service's tracing)."""
