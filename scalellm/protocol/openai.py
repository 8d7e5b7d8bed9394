"""The OpenAI HTTP API: request parsing and validation, error bodies, response and stream rendering.

Parsing turns a raw body into the project's own types (`PromptInput`, `SamplingParams`) or raises
`OpenAIError` with the status and JSON OpenAI would send. Rendering is built for the streaming hot
path: the constant head of every chunk (id, object, created, model) is serialized once per request,
and each event splices in only the new text, logprobs and finish reason.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import orjson

from scalellm.protocol.agent_fields import (ToolRequest, as_integer, check_known_fields, message_tool_fields,
                                            parse_response_format, parse_structured_outputs, parse_tools)
from scalellm.protocol.tool_parsers import DEFAULT_TOOL_PARSER, ToolParser, get_tool_parser
from scalellm.protocol.types import (FINISH_ABORT, MAX_PRIORITY, ChatPrompt, InfillPrompt, Logprob, PromptInput,
                                     RequestOutput, SamplingParams, StructuredOutput)

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_N = 128
MAX_TOKENS_WITHOUT_CONTEXT = 1 << 20
"""Upper bound on max_tokens while the model's context length is unknown."""
MAX_STOP_SEQUENCES = 32
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
MAX_TOKEN_ID = (1 << 32) - 1
"""Token ids travel as uint32 to the replicas."""
MAX_TOP_K = (1 << 31) - 1
MAX_SEED = (1 << 63) - 1

_NUMBER, _INTEGER, _BOOLEAN = {"type": "number"}, {"type": "integer"}, {"type": "boolean"}
SAMPLING_FIELDS: dict[str, tuple[dict, object]] = {
    "n": ({**_INTEGER, "minimum": 1, "maximum": MAX_N}, 1),
    "temperature": ({**_NUMBER, "minimum": 0}, 1.0),
    "top_p": ({**_NUMBER, "exclusiveMinimum": 0, "maximum": 1}, 1.0),
    "top_k": ({**_INTEGER, "minimum": -1, "maximum": MAX_TOP_K}, 0),
    "min_p": ({**_NUMBER, "minimum": 0, "maximum": 1}, 0.0),
    "seed": ({**_INTEGER, "minimum": -MAX_SEED - 1, "maximum": MAX_SEED}, None),
    "repetition_penalty": ({**_NUMBER, "exclusiveMinimum": 0}, 1.0),
    "presence_penalty": ({**_NUMBER, "minimum": -2, "maximum": 2}, 0.0),
    "frequency_penalty": ({**_NUMBER, "minimum": -2, "maximum": 2}, 0.0),
    "stop_token_ids": ({"type": "array", "maxItems": MAX_STOP_TOKEN_IDS,
                        "items": {**_INTEGER, "minimum": 0, "maximum": MAX_TOKEN_ID}}, []),
    "include_stop_str_in_output": (_BOOLEAN, False),
    "ignore_eos": (_BOOLEAN, False),
    "min_tokens": ({**_INTEGER, "minimum": 0, "maximum": MAX_TOKEN_ID}, 0),
    "skip_special_tokens": (_BOOLEAN, True),
    "priority": ({**_INTEGER, "minimum": -MAX_PRIORITY - 1, "maximum": MAX_PRIORITY}, None),
}
"""Sampling fields of both routes: name -> (JSON Schema of a non-null value, default). The parser
checks types from it and openapi.py publishes it; null always means the default."""
STOP_SCHEMA = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                         {"type": "array", "maxItems": MAX_STOP_SEQUENCES,
                          "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}}]}
_KINDS = {"integer": ((int,), "an integer"), "number": ((int, float), "a number"),
          "boolean": ((bool,), "a boolean"), "string": ((str,), "a string"), "array": ((list,), "a list"),
          "object": ((dict,), "an object")}


class OpenAIError(Exception):
    """An error answered as OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> bytes:
        """The JSON error body."""
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}})


def _invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


@dataclass
class ParsedRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    chat: bool
    model: str | None
    prompt: PromptInput
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int | None
    """None: no logprobs in the response; k: the chosen token plus k alternatives per position."""
    affinity_key: str
    """The prompt's leading characters, for prefix-affinity routing."""
    num_prompt_tokens_estimate: int
    tools: ToolRequest | None = None
    tool_parser: ToolParser | None = None
    """Set when the reply may hold tool calls: the parser that reads them."""
    echo: bool = False
    """Completions: the prompt's text goes before each choice's text."""
    extra_prompts: list[PromptInput] | None = None
    """Completions with a list of prompts: the prompts after the first (choices index prompt * n + sample)."""
    responses: object | None = None
    """A /v1/responses request's own fields, echoed in its response (gateway/responses.py); else None."""


_STREAM_FIELDS = ("model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "stop", "logprobs",
                  "response_format", "structured_outputs", "store", "logit_bias")
CHAT_FIELDS = frozenset({*SAMPLING_FIELDS, *_STREAM_FIELDS, "messages", "top_logprobs", "add_generation_prompt",
                         "tools", "tool_choice", "parallel_tool_calls"})
COMPLETION_FIELDS = frozenset({*SAMPLING_FIELDS, *_STREAM_FIELDS, "prompt", "echo", "suffix", "best_of"})


def structured_output(body: dict) -> StructuredOutput | None:
    """response_format or structured_outputs (not both, even a text response_format)."""
    response_format, structured = parse_response_format(body), parse_structured_outputs(body)
    if body.get("response_format") is not None and body.get("structured_outputs") is not None:
        raise _invalid("send either 'response_format' or 'structured_outputs', not both", param="structured_outputs")
    return response_format or structured


def load_json_object(body: bytes) -> dict:
    """Parse a body that must be a JSON object (invalid UTF-8 is invalid JSON)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _invalid("request body must be a JSON object")
    return value


def _token_ids(value) -> list[int] | None:
    """A list of token ids (integers in [0, MAX_TOKEN_ID]) as ints, else None."""
    if not isinstance(value, list):
        return None
    ids = [as_integer(v) for v in value]
    return ids if all(i is not None and 0 <= i <= MAX_TOKEN_ID for i in ids) else None


def _get(body: dict, name: str, kinds: tuple[type, ...], default=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if kinds == (int,) and (integer := as_integer(value)) is not None:
        return integer
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _invalid(f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, "
                       f"got {type(value).__name__}", param=name)
    return value


def _max_tokens(body: dict, default: int | None, max_model_len: int | None) -> int | None:
    """max_completion_tokens, else max_tokens, else `default` (both are checked when both are sent)."""
    limit = max_model_len or MAX_TOKENS_WITHOUT_CONTEXT
    values = {}
    for name in ("max_tokens", "max_completion_tokens"):
        value = values[name] = _get(body, name, (int,), None, "an integer")
        if value is not None and not 1 <= value <= limit:
            raise _invalid(f"'{name}' must be between 1 and {limit} (the model's context length), got {value}",
                           param=name)
    chosen = values["max_completion_tokens"]
    return chosen if chosen is not None else values["max_tokens"] if values["max_tokens"] is not None else default


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _invalid("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise _invalid(f"'stop' takes at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} "
                       "characters each", param="stop")
    return stop


def _bounded(name: str, value, schema: dict):
    """`value` after checking the schema's bounds (minimum, exclusiveMinimum, maximum; a list's length
    and items), so that every bad value is refused naming its field; token-id lists come back as ints."""
    if schema.get("type") == "array":
        ids = _token_ids(value)
        if ids is None or len(ids) > schema["maxItems"]:
            raise _invalid(f"'{name}' must be a list of at most {schema['maxItems']} token ids "
                           f"(integers from 0 to {MAX_TOKEN_ID})", param=name)
        return ids
    low, high = schema.get("minimum", -math.inf), schema.get("maximum", math.inf)
    above = schema.get("exclusiveMinimum", -math.inf)
    if not (low <= value <= high and value > above):
        low_text = f"> {above}" if "exclusiveMinimum" in schema else f">= {low}"
        bounds = low_text + (f" and <= {high}" if "maximum" in schema else "")
        raise _invalid(f"'{name}' must be {bounds}, got {value}", param=name)
    return value


_SAMPLING_DEFAULTS = {name: default for name, (_, default) in SAMPLING_FIELDS.items()}


def _sampling_values(body: dict) -> dict:
    values = dict(_SAMPLING_DEFAULTS)
    for name, (schema, default) in SAMPLING_FIELDS.items():
        if name in body:  # the fields a request leaves out keep their defaults unchecked
            kinds, what = _KINDS[schema["type"]]
            value = _get(body, name, kinds, default, what)
            values[name] = value if value is default else _bounded(name, value, schema)
    return values


def _sampling_params(body: dict, max_tokens: int | None, logprobs: int | None,
                     structured: StructuredOutput | None = None, keep_special_tokens: bool = False) -> SamplingParams:
    values = _sampling_values(body)
    if keep_special_tokens:
        values["skip_special_tokens"] = False
    try:
        return SamplingParams(**values, stop=_stop(body), max_tokens=max_tokens, logprobs=logprobs,
                              structured=structured)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _logprobs(body: dict, name: str) -> int | None:
    """A logprobs count (chat's top_logprobs, completions' logprobs): null or 0..MAX_LOGPROBS."""
    value = _get(body, name, (int,), None, "an integer")
    return None if value is None else _bounded(name, value, {"minimum": 0, "maximum": SamplingParams.MAX_LOGPROBS})


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False, "a boolean")
    options = _get(body, "stream_options", (dict,), None, "an object")
    include_usage = _get(options or {}, "include_usage", (bool,), False, "a boolean")
    if options is not None and not stream:
        raise _invalid("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return stream, include_usage


def _message_text(message: dict, index: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid(f"messages[{index}].content must be a string or a list of parts", param="messages")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise _invalid(f"messages[{index}].content supports only text parts "
                           '({"type": "text", "text": "..."})', param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list of messages", param="messages")
    normalized = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid(f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise _invalid(f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}, got {role!r}",
                           param="messages")
        text = _message_text(message, i)
        if text is None and role != "assistant":
            raise _invalid(f"messages[{i}].content is required for role {role!r}", param="messages")
        normalized.append({"role": role, "content": text or "", **message_tool_fields(message, i)})
    return normalized


def parse_chat_request(raw: bytes, max_model_len: int | None, affinity_chars: int = 256,
                       tool_parser: str = DEFAULT_TOOL_PARSER) -> ParsedRequest:
    """Validate a /v1/chat/completions body; raises `OpenAIError` (400) on bad input."""
    body = load_json_object(raw)
    check_known_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    return chat_request_from_body(body, max_model_len, affinity_chars, tool_parser)


def chat_request_from_body(body: dict, max_model_len: int | None, affinity_chars: int = 256,
                           tool_parser: str = DEFAULT_TOOL_PARSER) -> ParsedRequest:
    """A parsed chat request from a body already checked for unknown fields (the Responses API maps onto it)."""
    messages = _chat_messages(body)
    tools = parse_tools(body)
    parser = get_tool_parser(tool_parser) if tools is not None and tools.parses_calls else None
    structured = structured_output(body)
    forced = tools.forced(parser) if parser is not None else None
    if forced is not None and structured is not None:
        raise _invalid("'tool_choice' forces a tool call, which cannot also follow 'response_format'",
                       param="tool_choice")
    wants_logprobs = _get(body, "logprobs", (bool,), False, "a boolean")
    top_logprobs = _logprobs(body, "top_logprobs")
    if top_logprobs is not None and not wants_logprobs:
        raise _invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top_logprobs or 0) if wants_logprobs else None
    params = _sampling_params(body, _max_tokens(body, None, max_model_len), logprobs, forced or structured,
                              keep_special_tokens=parser is not None and parser.keep_special_tokens)
    stream, include_usage = _stream_options(body)
    add_generation_prompt = _get(body, "add_generation_prompt", (bool,), True, "a boolean")
    text = "".join(m["content"] for m in messages)
    tool_list = tools.tools if tools is not None else None
    return ParsedRequest(True, _get(body, "model", (str,), None, "a string"),
                         ChatPrompt(messages, add_generation_prompt, tool_list), params, stream, include_usage,
                         logprobs, text[:affinity_chars], len(text) // 4 + 8 * len(messages), tools, parser)


MAX_PROMPTS = 64


def _one_prompt(prompt) -> str | list[int] | None:
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and (ids := _token_ids(prompt)) is not None:
        return ids
    return None


def _completion_prompts(body: dict) -> list[str | list[int]]:
    """The prompts: a string, token ids, or a list of several of either (one choice each per sample)."""
    prompt = body.get("prompt")
    single = _one_prompt(prompt)
    if single is not None:
        return [single]
    if isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS and all(isinstance(p, (str, list)) for p in prompt):
        prompts = [_one_prompt(p) for p in prompt]
        if all(p is not None for p in prompts):
            return prompts
    raise _invalid(f"'prompt' must be a non-empty string, a list of token ids, or a list of at most {MAX_PROMPTS} "
                   "of either", param="prompt")


def _infill(prompts: list, suffix) -> list[PromptInput]:
    if suffix is None or suffix == "":
        return prompts
    if not isinstance(suffix, str):
        raise _invalid("'suffix' must be a string", param="suffix")
    if not all(isinstance(p, str) for p in prompts):
        raise _invalid("'suffix' needs text prompts, not token ids", param="suffix")
    return [InfillPrompt(p, suffix) for p in prompts]


def parse_completion_request(raw: bytes, max_model_len: int | None, affinity_chars: int = 256) -> ParsedRequest:
    """Validate a /v1/completions body; raises `OpenAIError` (400) on bad input."""
    body = load_json_object(raw)
    check_known_fields(body, COMPLETION_FIELDS, "/v1/completions")
    prompts = _completion_prompts(body)
    echo = _get(body, "echo", (bool,), False, "a boolean")
    logprobs = _logprobs(body, "logprobs")
    if echo and (logprobs is not None or not all(isinstance(p, str) for p in prompts) or body.get("suffix")):
        raise _invalid("'echo' is supported for text prompts without 'logprobs' or 'suffix'", param="echo")
    params = _sampling_params(body, _max_tokens(body, 16, max_model_len), logprobs, structured_output(body))
    best_of = _get(body, "best_of", (int,), None, "an integer")
    if best_of is not None and (best_of != 1 or params.n != 1):
        raise _invalid("'best_of' is supported only as 1, with 'n' 1 (no reranking)", param="best_of")
    stream, include_usage = _stream_options(body)
    prompts = _infill(prompts, body.get("suffix"))
    first = prompts[0]
    if isinstance(first, (str, InfillPrompt)):
        text = first if isinstance(first, str) else first.prefix
        key, estimate = text[:affinity_chars], len(text) // 4 + 1
    else:
        key, estimate = ",".join(map(str, first[:affinity_chars // 4])), len(first)
    return ParsedRequest(False, _get(body, "model", (str,), None, "a string"), first, params,
                         stream, include_usage, logprobs, key, estimate * len(prompts), echo=echo,
                         extra_prompts=prompts[1:] or None)


# Seeded from os.urandom once. Ids name requests and are no secret (nothing is fetched by id): a draw
# here costs less than uuid4's system call per request.
_ID_BITS = random.Random()


def new_request_id(chat: bool) -> str:
    """An OpenAI-style id: chatcmpl-… or cmpl-… and 32 random hex digits."""
    return ("chatcmpl-" if chat else "cmpl-") + f"{_ID_BITS.getrandbits(128):032x}"


def check_not_aborted(output: RequestOutput) -> None:
    """Turn an engine-side abort into an error (the client must not see a truncated success)."""
    for sample in output.outputs:
        if sample.finish_reason == FINISH_ABORT:
            raise OpenAIError(503, "the request was aborted by the server before it finished; retry it",
                              type="server_error", code="aborted")


def _token_text(logprob: Logprob, token_id: int) -> str:
    return logprob.decoded_token if logprob.decoded_token is not None else f"token_id:{token_id}"


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k), key=lambda item: item[1].rank)[:k]


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> list[dict]:
    """choices[].logprobs.content for chat: token, logprob, bytes and top_logprobs per position."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) or Logprob(float("-inf"), 0)
        token = _token_text(chosen, token_id)
        top = [{"token": (text := _token_text(lp, t)), "logprob": lp.logprob, "bytes": list(text.encode())}
               for t, lp in _top(entry, k)]
        content.append({"token": token, "logprob": chosen.logprob, "bytes": list(token.encode()),
                        "top_logprobs": top})
    return content


class CompletionLogprobs:
    """The completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset) of one sample."""

    __slots__ = ("k", "text_offset", "tokens", "token_logprobs", "top_logprobs", "offsets")

    def __init__(self, k: int) -> None:
        self.k = k
        self.text_offset = 0
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict[str, float]] = []
        self.offsets: list[int] = []

    def add(self, token_ids: list[int], entries: list[dict[int, Logprob]]) -> dict:
        """Append positions and return the object for just these positions (a stream delta)."""
        delta = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) or Logprob(float("-inf"), 0)
            token = _token_text(chosen, token_id)
            delta["tokens"].append(token)
            delta["token_logprobs"].append(chosen.logprob)
            delta["top_logprobs"].append({_token_text(lp, t): lp.logprob for t, lp in _top(entry, self.k)})
            delta["text_offset"].append(self.text_offset)
            self.text_offset += len(token)
        self.tokens += delta["tokens"]
        self.token_logprobs += delta["token_logprobs"]
        self.top_logprobs += delta["top_logprobs"]
        self.offsets += delta["text_offset"]
        return delta

    def whole(self) -> dict:
        """The object for all positions so far."""
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.offsets}


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    """OpenAI's usage object."""
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def created_now() -> int:
    """The `created` field: Unix seconds."""
    return int(time.time())
