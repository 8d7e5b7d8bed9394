"""One OpenAI request, streamed or not, with every content chunk timed.

Definitions follow ``vllm bench serve``:

* TTFT: send -> first chunk carrying content (non-empty ``delta.content`` for
  chat, ``text`` for completions). vLLM's client takes the first chunk with any
  ``choices``; a server that sends a role-only chunk before the first token
  would fake a low TTFT that way, so content is required here. Without
  streaming TTFT equals the e2e latency.
* ITL: the gaps between consecutive content chunks (a chunk may carry several tokens).
  A tool call's name and argument deltas count as content.
* E2E latency: send -> the last chunk carrying ``choices`` (as vLLM: the
  trailing usage chunk and ``[DONE]`` are not part of it), or the whole body
  without streaming. ``stream_end`` records when ``[DONE]`` arrived.
* Token counts come from ``usage``; a response without usage is a failure,
  because the throughput numbers would otherwise be guesses.

The client is meant to be cheap on CPU: the body is serialized once ahead of
time, SSE lines are split by aiohttp's reader and parsed with orjson here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from scalellm.bench.datasets import RequestSpec

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
TIMINGS_HEADER = "x-scalellm-timings"
TIMINGS_FIELD = "scalellm_timings"
_MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class ClientConfig:
    """What every request of a run shares."""

    base_url: str
    model: str
    endpoint: str = "chat"
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    keepalive: bool = True
    timeout_s: float = 600.0
    extra_fields: dict = field(default_factory=dict)
    """Added to every chat body as they are: ``response_format``, ``tools``, ``tool_choice``."""

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {self.endpoint!r}")

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers


@dataclass
class RequestResult:
    """Raw measurement of one request; times in seconds."""

    success: bool = False
    error: str = ""
    start_wall: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    stream_end: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    num_chunks: int = 0
    timings: dict | None = None

    @property
    def end_wall(self) -> float:
        """Wall-clock time the response ended (for the stage breakdown)."""
        return self.start_wall + self.latency


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or a full endpoint URL -> ``http://h:p``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https://, got {url!r}")
    for suffix in (*ENDPOINT_PATHS.values(), "/v1"):
        if url.endswith(suffix):
            return url[: -len(suffix)]
    return url


def build_body(spec: RequestSpec, config: ClientConfig) -> bytes:
    """The JSON body for one request, serialized once."""
    body: dict = {"model": config.model, "max_tokens": spec.max_tokens,
                  "temperature": config.temperature, "stream": config.stream}
    if config.endpoint == "chat":
        body["messages"] = list(spec.messages or ({"role": "user", "content": spec.prompt},))
        body.update(config.extra_fields)
    else:
        body["prompt"] = spec.prompt
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    return orjson.dumps(body)


def make_session(config: ClientConfig, concurrency: int) -> aiohttp.ClientSession:
    """A session whose connection pool is sized to the concurrency."""
    connector = aiohttp.TCPConnector(limit=max(1, concurrency), force_close=not config.keepalive)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=config.headers,
                                 skip_auto_headers=("User-Agent",))


async def send_request(session: aiohttp.ClientSession, config: ClientConfig, body: bytes) -> RequestResult:
    """Send one request and time it; never raises except on cancellation."""
    result = RequestResult(start_wall=time.time())
    start = time.perf_counter()
    try:
        async with session.post(config.url, data=body) as response:
            if response.status != 200:
                text = (await response.text(errors="replace"))[:_MAX_ERROR_CHARS]
                raise BadResponse(f"HTTP {response.status}: {text}")
            result.timings = _header_timings(response)
            if config.stream:
                await _read_stream(response, result, start, config.endpoint)
            else:
                await _read_body(response, result, start, config.endpoint)
        result.success = True
    except asyncio.CancelledError:
        raise
    except Exception as error:  # every failure is data, not a crash
        result.error = _describe(error)
        result.latency = time.perf_counter() - start
    return result


class BadResponse(Exception):
    """The server answered, but not with a usable OpenAI response."""


async def _read_stream(response: aiohttp.ClientResponse, result: RequestResult,
                       start: float, endpoint: str) -> None:
    last = last_choice = start
    done = False
    usage = None
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            done = True
            break
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict):
            raise BadResponse(f"stream chunk is not a JSON object: {payload[:100]!r}")
        if "error" in chunk:
            raise BadResponse(f"error in stream: {str(chunk['error'])[:_MAX_ERROR_CHARS]}")
        now = time.perf_counter()
        if chunk.get("choices"):
            last_choice = now
        if _chunk_text(chunk, endpoint):
            if result.num_chunks == 0:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            result.num_chunks += 1
            last = now
        if chunk.get("usage"):
            usage = chunk["usage"]
        if isinstance(chunk.get(TIMINGS_FIELD), dict):
            result.timings = chunk[TIMINGS_FIELD]
    result.stream_end = time.perf_counter() - start
    result.latency = last_choice - start
    if not done:
        raise BadResponse("stream ended without data: [DONE]")
    if result.num_chunks == 0:
        raise BadResponse("stream carried no content")
    _take_usage(result, usage)


async def _read_body(response: aiohttp.ClientResponse, result: RequestResult,
                     start: float, endpoint: str) -> None:
    raw = await response.read()
    result.latency = result.ttft = result.stream_end = time.perf_counter() - start
    data = orjson.loads(raw)
    if not isinstance(data, dict) or not data.get("choices"):
        raise BadResponse(f"response has no choices: {raw[:_MAX_ERROR_CHARS]!r}")
    result.num_chunks = 1
    if isinstance(data.get(TIMINGS_FIELD), dict):
        result.timings = data[TIMINGS_FIELD]
    _take_usage(result, data.get("usage"))


def _chunk_text(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices")
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or delta.get("reasoning_content") or _tool_call_text(delta)


def _tool_call_text(delta: dict) -> str:
    """The name and argument text a tool-call delta carries (a token of a tool call is content too)."""
    calls = delta.get("tool_calls")
    if not isinstance(calls, list):
        return ""
    parts = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [str(function.get("name") or ""), str(function.get("arguments") or "")]
    return "".join(parts)


def _take_usage(result: RequestResult, usage: dict | None) -> None:
    if not isinstance(usage, dict) or "completion_tokens" not in usage:
        raise BadResponse("response has no usage.completion_tokens")
    result.output_tokens = int(usage["completion_tokens"])
    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)


def _header_timings(response: aiohttp.ClientResponse) -> dict | None:
    raw = response.headers.get(TIMINGS_HEADER)
    if not raw:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _describe(error: BaseException) -> str:
    text = str(error) or repr(error)
    if isinstance(error, BadResponse):
        return text[:_MAX_ERROR_CHARS]
    return f"{type(error).__name__}: {text}"[:_MAX_ERROR_CHARS]
