"""Maps the project's own types to and from the wire format (proto/scalellm/v1/replica.proto).

This is the only module that imports the generated protobuf code; the replica server and the
gateway's replica client hold protobuf messages only as opaque values they got from here.

After editing the proto, regenerate the code and commit it (tests/unit/test_proto_current.py checks
that the committed files are current):

    .venv/bin/python -m scalellm.rpc.codegen
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from scalellm.protocol.types import (
    ChatPrompt,
    CompletionOutput,
    InfillPrompt,
    EngineHealth,
    EngineLoad,
    Logprob,
    PromptInput,
    RequestMetrics,
    RequestOutput,
    ResumedSample,
    SamplingParams,
    StructuredOutput,
)
from scalellm.rpc.pb import replica_pb2 as pb

SERVICE_NAME = "scalellm.v1.Replica"


@dataclass(frozen=True)
class RpcMethod:
    """One method of the Replica service: its path and how its messages are (de)serialized."""

    name: str
    request_type: Any
    response_type: Any

    @property
    def path(self) -> str:
        """The method's HTTP/2 path, e.g. "/scalellm.v1.Replica/Session"."""
        return f"/{SERVICE_NAME}/{self.name}"

    @property
    def request_serializer(self) -> Callable[[Any], bytes]:
        return self.request_type.SerializeToString

    @property
    def request_deserializer(self) -> Callable[[bytes], Any]:
        return self.request_type.FromString

    @property
    def response_serializer(self) -> Callable[[Any], bytes]:
        return self.response_type.SerializeToString

    @property
    def response_deserializer(self) -> Callable[[bytes], Any]:
        return self.response_type.FromString

    def new_request(self) -> Any:
        """An empty request message (Health, Load and Info take no fields)."""
        return self.request_type()


HEALTH = RpcMethod("Health", pb.HealthRequest, pb.HealthResponse)
LOAD = RpcMethod("Load", pb.LoadRequest, pb.LoadResponse)
INFO = RpcMethod("Info", pb.InfoRequest, pb.InfoResponse)
SESSION = RpcMethod("Session", pb.SessionRequest, pb.SessionResponse)

_FINISH_TO_PB = {None: pb.FINISH_REASON_NONE, "stop": pb.FINISH_REASON_STOP,
                 "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_FINISH_FROM_PB = {value: key for key, value in _FINISH_TO_PB.items()}


class GenerateArgs(NamedTuple):
    """A decoded GenerateRequest: the arguments of `EngineClient.generate` plus the gateway's timestamp."""

    request_id: str
    prompt: PromptInput
    params: SamplingParams
    gateway_receive_time: float
    resumed_samples: list[ResumedSample]
    """The unfinished samples a failed replica left, after their delivered output
    (see GenerateRequest.resumed_samples); [] for a new request."""
    final_only: bool = False
    """Send one chunk, when the request finishes (see GenerateRequest.final_only)."""


# --- GenerateRequest ---------------------------------------------------------------------------

def encode_request(request_id: str, prompt: PromptInput, params: SamplingParams,
                   gateway_receive_time: float, resumed_samples: Sequence[ResumedSample] = (),
                   final_only: bool = False) -> Any:
    """Build a GenerateRequest. Raises ValueError for chat content that is not text."""
    request = pb.GenerateRequest(request_id=request_id, params=_encode_params(params),
                                 gateway_receive_time=gateway_receive_time, final_only=final_only)
    if resumed_samples:
        request.resumed_samples.extend(pb.ResumedSample(index=s.index, token_ids=s.token_ids,
                                                        cumulative_logprob=s.cumulative_logprob)
                                       for s in resumed_samples)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, ChatPrompt):
        request.chat.messages.extend(_encode_message(m) for m in prompt.messages)
        request.chat.tools_json = json.dumps(prompt.tools) if prompt.tools else ""
        request.add_generation_prompt = prompt.add_generation_prompt
    elif isinstance(prompt, InfillPrompt):
        request.infill.prefix, request.infill.suffix = prompt.prefix, prompt.suffix
    else:
        request.token_ids.ids.extend(prompt)
    return request


def decode_request(request: Any) -> GenerateArgs:
    """Unpack a GenerateRequest. Raises ValueError for a missing prompt or invalid sampling parameters."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        prompt: PromptInput = request.text
    elif kind == "token_ids":
        prompt = list(request.token_ids.ids)
    elif kind == "chat":
        messages = [_decode_message(m) for m in request.chat.messages]
        tools = json.loads(request.chat.tools_json) if request.chat.tools_json else None
        prompt = ChatPrompt(messages=messages, add_generation_prompt=request.add_generation_prompt, tools=tools)
    elif kind == "infill":
        prompt = InfillPrompt(request.infill.prefix, request.infill.suffix)
    else:
        raise ValueError("the request has no prompt: send text, token ids or chat messages")
    resumed = [ResumedSample(s.index, tuple(s.token_ids),
                             s.cumulative_logprob if s.HasField("cumulative_logprob") else None)
               for s in request.resumed_samples]
    return GenerateArgs(request.request_id, prompt, _decode_params(request.params),
                        request.gateway_receive_time, resumed, request.final_only)


def set_trace_context(request: Any, carrier: dict[str, str]) -> None:
    """Put the W3C trace context `carrier` ({"traceparent": ...}) in a GenerateRequest."""
    request.trace_context.update(carrier)


def trace_context(request: Any) -> dict[str, str]:
    """A GenerateRequest's W3C trace context; {} when the gateway does not trace it."""
    return dict(request.trace_context) if request.trace_context else {}


def _encode_message(message: dict) -> Any:
    tool_calls = message.get("tool_calls")
    return pb.ChatMessage(role=message.get("role", ""), content=_content_text(message.get("content")),
                          tool_calls_json=json.dumps(tool_calls) if tool_calls else "",
                          tool_call_id=message.get("tool_call_id") or "", name=message.get("name") or "")


def _decode_message(m: Any) -> dict:
    message = {"role": m.role, "content": m.content}
    if m.tool_calls_json:
        message["tool_calls"] = json.loads(m.tool_calls_json)
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.name:
        message["name"] = m.name
    return message


def _content_text(content: Any) -> str:
    """OpenAI message content as one string: a string as is, text parts joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type", "text") != "text":
                raise ValueError("only text content parts are supported in chat messages")
            texts.append(str(part.get("text", "")))
        return "\n".join(texts)
    raise ValueError("message content must be a string or a list of text parts")


def _encode_params(params: SamplingParams) -> Any:
    return pb.SamplingParameters(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
        min_p=params.min_p, seed=params.seed, repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        stop=params.stop, stop_token_ids=params.stop_token_ids,
        include_stop_str_in_output=params.include_stop_str_in_output, ignore_eos=params.ignore_eos,
        max_tokens=params.max_tokens, min_tokens=params.min_tokens, logprobs=params.logprobs,
        skip_special_tokens=params.skip_special_tokens, priority=params.priority,
        structured=(pb.StructuredOutput(kind=params.structured.kind, spec=params.structured.spec)
                    if params.structured is not None else None))


def _decode_params(p: Any) -> SamplingParams:
    return SamplingParams(
        n=p.n, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None, repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
        include_stop_str_in_output=p.include_stop_str_in_output, ignore_eos=p.ignore_eos,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None, min_tokens=p.min_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        skip_special_tokens=p.skip_special_tokens, priority=p.priority if p.HasField("priority") else None,
        structured=StructuredOutput(p.structured.kind, p.structured.spec) if p.HasField("structured") else None)


# --- GenerateChunk (the per-token hot path: keep it lean) ---------------------------------------

def encode_output(output: RequestOutput, num_generated_tokens: int, *, first: bool) -> Any:
    """Build the GenerateChunk for one delta RequestOutput; the prompt is only sent on the first chunk."""
    chunk = pb.GenerateChunk(outputs=[_encode_completion(c) for c in output.outputs],
                             finished=output.finished, num_prompt_tokens=output.num_prompt_tokens,
                             num_generated_tokens=num_generated_tokens)
    if output.metrics is not None:
        m = output.metrics
        chunk.metrics.CopyFrom(pb.RequestTimings(
            gateway_receive_time=m.gateway_receive_time, replica_receive_time=m.replica_receive_time,
            queued_time=m.queued_time, scheduled_time=m.scheduled_time, first_token_time=m.first_token_time,
            last_token_time=m.last_token_time, num_cached_tokens=m.num_cached_tokens))
    if first:
        if output.prompt is not None:
            chunk.prompt = output.prompt
        if output.prompt_token_ids:
            chunk.prompt_token_ids.extend(output.prompt_token_ids)
    return chunk


def _encode_completion(c: CompletionOutput) -> Any:
    delta = pb.CompletionDelta(index=c.index, text=c.text, token_ids=c.token_ids,
                               cumulative_logprob=c.cumulative_logprob,
                               finish_reason=_FINISH_TO_PB[c.finish_reason])
    if c.logprobs is not None:
        delta.logprobs.SetInParent()
        delta.logprobs.positions.extend(
            pb.PositionLogprobs(entries=[
                pb.TokenLogprob(token_id=token_id, logprob=lp.logprob, rank=lp.rank,
                                decoded_token=lp.decoded_token)
                for token_id, lp in position.items()])
            for position in c.logprobs)
    if c.stop_reason is not None:
        if isinstance(c.stop_reason, str):
            delta.stop_string = c.stop_reason
        else:
            delta.stop_token_id = c.stop_reason
    return delta


def decode_output(request_id: str, chunk: Any) -> RequestOutput:
    """Unpack a GenerateChunk into a delta RequestOutput of `request_id`."""
    metrics = None
    if chunk.HasField("metrics"):
        m = chunk.metrics
        metrics = RequestMetrics(
            gateway_receive_time=m.gateway_receive_time, replica_receive_time=m.replica_receive_time,
            queued_time=m.queued_time, scheduled_time=m.scheduled_time, first_token_time=m.first_token_time,
            last_token_time=m.last_token_time, num_cached_tokens=m.num_cached_tokens)
    # Positional arguments and [:] copies of repeated fields: this runs once per request and step.
    return RequestOutput(request_id, [_decode_completion(d) for d in chunk.outputs], chunk.finished,
                         chunk.prompt if chunk.HasField("prompt") else None, chunk.prompt_token_ids[:],
                         chunk.num_prompt_tokens, metrics)


def _decode_completion(d: Any) -> CompletionOutput:
    logprobs = None
    if d.HasField("logprobs"):
        logprobs = [{e.token_id: Logprob(logprob=e.logprob, rank=e.rank,
                                         decoded_token=e.decoded_token if e.HasField("decoded_token")
                                         else None)
                     for e in position.entries}
                    for position in d.logprobs.positions]
    finish_reason, stop_reason = _FINISH_FROM_PB[d.finish_reason], None
    if finish_reason is not None:  # a stop reason comes with a finish
        kind = d.WhichOneof("stop_reason")
        stop_reason = d.stop_string if kind == "stop_string" else d.stop_token_id if kind else None
    return CompletionOutput(d.index, d.text, d.token_ids[:],
                            d.cumulative_logprob if d.HasField("cumulative_logprob") else None,
                            logprobs, finish_reason, stop_reason)


def num_generated_tokens(chunk: Any) -> int:
    """Output tokens generated so far over all samples, as the replica counted them."""
    return chunk.num_generated_tokens


# --- Session -------------------------------------------------------------------------------------

def session_generate(request: Any) -> Any:
    """The SessionRequest that starts `request` (a GenerateRequest from encode_request)."""
    return pb.SessionRequest(generate=request)


def session_generate_many(requests: Sequence[Any]) -> Any:
    """One SessionRequest that starts every GenerateRequest of `requests` (at least one), in order."""
    message = pb.SessionRequest(generate=requests[0])
    message.more_generates.extend(requests[1:])
    return message


def is_generate_request(message: Any) -> bool:
    """True for a GenerateRequest (from encode_request), False for a SessionRequest."""
    return type(message) is pb.GenerateRequest


def session_cancel(request_id: str) -> Any:
    """The SessionRequest that aborts the request `request_id`."""
    return pb.SessionRequest(cancel_request_id=request_id)


def decode_session_request(message: Any) -> list[tuple[str, Any]]:
    """What a SessionRequest asks, in order: ("generate", GenerateRequest) for each request it starts,
    or [("cancel", request_id)]; [] for an empty message."""
    kind = message.WhichOneof("kind")
    if kind == "generate":
        return [("generate", message.generate), *(("generate", more) for more in message.more_generates)]
    if kind == "cancel_request_id":
        return [("cancel", message.cancel_request_id)]
    return []


def encode_session_response(chunks: list[tuple[str, Any]], errors: list[tuple[str, int, str]]) -> Any:
    """A SessionResponse from (request_id, GenerateChunk) and (request_id, status code, message) lists."""
    response = pb.SessionResponse()
    for request_id, chunk in chunks:
        response.chunks.add(request_id=request_id, chunk=chunk)
    for request_id, code, message in errors:
        response.errors.add(request_id=request_id, code=code, message=message)
    return response


def session_chunks(response: Any) -> list[tuple[str, Any]]:
    """The (request_id, GenerateChunk) pairs of a SessionResponse, in order."""
    return [(item.request_id, item.chunk) for item in response.chunks]


def session_errors(response: Any) -> list[tuple[str, int, str]]:
    """The (request_id, status code, message) triples of a SessionResponse."""
    return [(item.request_id, item.code, item.message) for item in response.errors]


# --- Health, Load, Info --------------------------------------------------------------------------

def encode_health(health: EngineHealth) -> Any:
    """HealthResponse: SERVING or NOT_SERVING with the engine's detail."""
    status = pb.HealthResponse.SERVING if health.healthy else pb.HealthResponse.NOT_SERVING
    return pb.HealthResponse(status=status, detail=health.detail)


def decode_health(response: Any) -> EngineHealth:
    """EngineHealth from a HealthResponse; anything but SERVING is unhealthy."""
    return EngineHealth(healthy=response.status == pb.HealthResponse.SERVING, detail=response.detail)


_LOAD_FIELDS = ("num_running", "num_waiting", "num_free_blocks", "num_total_blocks",
                "num_tokens_in_flight", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens",
                "num_preemptions", "num_requests_received", "num_spans_dropped")


def encode_load(load: EngineLoad) -> Any:
    """LoadResponse with every EngineLoad field."""
    return pb.LoadResponse(**{name: getattr(load, name) for name in _LOAD_FIELDS})


def decode_load(response: Any) -> EngineLoad:
    """EngineLoad from a LoadResponse."""
    return EngineLoad(**{name: getattr(response, name) for name in _LOAD_FIELDS})


def encode_info(model_name: str, max_model_len: int, weights: str) -> Any:
    """InfoResponse: what the replica serves."""
    return pb.InfoResponse(model_name=model_name, max_model_len=max_model_len, weights=weights)


def decode_info(response: Any) -> tuple[str, int, str]:
    """(model_name, max_model_len, weights) from an InfoResponse."""
    return response.model_name, response.max_model_len, response.weights
