"""The inference handlers: /v1/chat/completions and /v1/completions, streamed (SSE) and not.

One path for every request:

    admit (auth, draining, rate limit, in-flight cap) → parse → dispatch to a replica → first output
      └─ ReplicaUnavailable before the first output: count the failure, try another replica
      └─ a replica failure after some output: resume the unfinished samples on another replica after
         their delivered tokens (failover.py; each prompt of a completions request on its own)
    → stream events or build the body → release the replica's load and the admission slot (always)

Successful responses carry the request's stage timestamps as the non-standard ``scalellm_timings``
field (see `stage_timings` and rendering.py) unless `GatewayConfig.report_timings` is off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import orjson

from scalellm.gateway.auth import INFERENCE, ApiKeyAuth
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.failover import ResumingStream
from scalellm.gateway.guards import GuardedStream, GuardError, GuardPolicy
from scalellm.gateway.http import HttpConnection, Request
from scalellm.gateway.fair_share import FairShare
from scalellm.gateway.limits import AdmissionGate, RateLimiter, TokenRateLimiter
from scalellm.gateway.metrics import GatewayMetrics
from scalellm.gateway.policies import RouteRequest
from scalellm.gateway.rendering import ResponseBuilder, StreamRenderer, error_event, num_choices
from scalellm.gateway.responses import ResponsesRenderer, parse_responses_request
from scalellm.gateway.router import Dispatch, NoReplicaAvailable, Router
from scalellm.protocol.openai import (OpenAIError, ParsedRequest, created_now, new_request_id,
                                      parse_chat_request, parse_completion_request)
from scalellm.protocol.tool_parsers import tool_parser_for_model
from scalellm.protocol.types import RequestMetrics, RequestOutput, ResumedSample, SamplingParams

CHAT, COMPLETIONS, RESPONSES = "/v1/chat/completions", "/v1/completions", "/v1/responses"
ROUTES = (CHAT, COMPLETIONS, RESPONSES)
from scalellm.rpc.client import ReplicaError, ReplicaUnavailable

access_log = logging.getLogger("scalellm.gateway.access")


@dataclass
class ModelInfo:
    """The served model's name and context length (from the config, or learned from the replicas)."""

    name: str | None = None
    max_model_len: int | None = None


class RequestRecord:
    """Timings and counts of one request, for metrics and the access log."""

    __slots__ = ("request_id", "route", "receive_time", "routed_time", "first_send_time", "replica",
                 "num_prompt_tokens", "num_output_tokens", "replica_metrics", "attempts", "admitted_time",
                 "parsed_time", "first_output_time", "key_id", "finish_reason", "parsed", "trace", "expired")

    def __init__(self, request_id: str, route: str, receive_time: float) -> None:
        self.request_id = request_id
        self.route = route
        self.receive_time = receive_time
        self.routed_time = 0.0
        self.first_send_time = 0.0
        self.replica = ""
        self.num_prompt_tokens = 0
        self.num_output_tokens = 0
        self.replica_metrics = None
        self.attempts = 0
        self.admitted_time = self.parsed_time = self.first_output_time = 0.0
        self.key_id: str | None = None
        """The API key's short digest id (auth.py), None before admission."""
        self.finish_reason: str | None = None
        self.parsed: ParsedRequest | None = None
        self.trace = None
        """The root span when the gateway traces requests (gateway/tracing.py), else None."""
        self.expired = False
        """Set when the request's deadline cancels its task (InferenceService.handle)."""


class InferenceService:
    """Serves the two generation routes over the router's replicas."""

    tracing = None
    """A GatewayTracing (gateway/tracing.py) when requests are traced; set by GatewayApp."""

    def __init__(self, config: GatewayConfig, router: Router, metrics: GatewayMetrics, auth: ApiKeyAuth,
                 model: ModelInfo, guards: GuardPolicy | None = None) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self.auth = auth
        self.model = model
        self.guards = guards or GuardPolicy()
        self.gate = AdmissionGate(config.max_queue)
        metrics.track_in_flight(lambda: self.gate.num_in_flight)
        self.rate_limiter = RateLimiter(config.rate_limit_rpm) if config.rate_limit_rpm else None
        self.token_limiter = TokenRateLimiter()
        self.fair_share = FairShare(config.max_concurrent) if config.max_concurrent else None
        self.draining = False

    def admit(self, request: Request) -> str:
        """The caller's identity, or `OpenAIError` when the request may not start; on success the caller
        owns a gate slot."""
        identity = self.auth.authorize(request.headers.get(b"authorization"), INFERENCE)
        if self.draining:
            raise OpenAIError(503, "the gateway is shutting down; retry on another instance",
                              type="server_error", code="draining")
        if self.rate_limiter is not None:
            wait_s = self.rate_limiter.check(identity)
            if wait_s:
                raise OpenAIError(429, f"rate limit of {self.config.rate_limit_rpm:g} requests per minute "
                                  f"exceeded; retry in {wait_s} s", type="rate_limit_exceeded",
                                  code="rate_limit_exceeded", headers=((b"retry-after", str(wait_s).encode()),))
        tokens_per_minute = self.auth.options(identity).tokens_per_minute
        if tokens_per_minute is not None and (wait_s := self.token_limiter.check(identity, tokens_per_minute)):
            raise OpenAIError(429, f"this API key's limit of {tokens_per_minute:g} generated tokens per minute "
                              f"is used up; retry in {wait_s} s", type="rate_limit_exceeded",
                              code="rate_limit_exceeded", headers=((b"retry-after", str(wait_s).encode()),))
        if not self.gate.try_enter():
            raise OpenAIError(429, f"the gateway is at capacity ({self.gate.max_in_flight} requests in "
                              "flight); retry shortly", type="rate_limit_exceeded", code="queue_full",
                              headers=((b"retry-after", b"1"),))
        return identity

    async def handle(self, request: Request, conn: HttpConnection, route: str) -> int:
        """Serve one generation request on `route` (one of ROUTES); returns the HTTP status sent."""
        record = RequestRecord(_request_id(route), route, request.receive_time)
        if self.tracing is not None:
            headers = request.headers
            self.tracing.begin(headers.get(b"traceparent"), headers.get(b"tracestate"), record)
        try:
            record.key_id = self.admit(request)
        except OpenAIError as error:
            return self._send_error(conn, error, record)
        record.admitted_time = time.time()
        # The deadline is a timer that cancels the request's task: a tenth of asyncio.timeout's cost
        # per request. record.expired tells its cancellation from a client that went away.
        task = asyncio.current_task(conn.loop)
        deadline = conn.loop.call_later(self.config.request_timeout_s, _expire, task, record)
        try:
            return await self._serve(request, conn, route, record)
        except OpenAIError as error:
            return self._send_error(conn, error, record)
        except asyncio.CancelledError:
            if not record.expired:
                self._finish(record, 499, "client disconnected")
                raise
            task.uncancel()
            return self._send_error(conn, self._deadline_error(), record)
        finally:
            deadline.cancel()
            self.gate.leave()

    def _parse(self, request: Request, route: str) -> ParsedRequest:
        limit, chars = self.model.max_model_len, self.config.prefix_affinity_chars
        tool_parser = self.config.tool_call_parser or tool_parser_for_model(self.model.name)
        if route == COMPLETIONS:
            parsed = parse_completion_request(request.body, limit, chars)
        elif route == CHAT:
            parsed = parse_chat_request(request.body, limit, chars, tool_parser)
        else:
            parsed = parse_responses_request(request.body, limit, chars, tool_parser)
        if self.model.name is not None and parsed.model is not None and parsed.model != self.model.name:
            raise OpenAIError(404, f"the model '{parsed.model}' does not exist; this server serves "
                              f"'{self.model.name}'", param="model", code="model_not_found")
        return parsed

    async def _serve(self, request: Request, conn: HttpConnection, route: str, record: RequestRecord) -> int:
        identity = record.key_id
        parsed = await self.guards.check_request(self._parse(request, route), identity, self._complete)
        if parsed.params.priority is None:
            parsed.params.priority = self.auth.options(identity).priority
        record.parsed, record.parsed_time = parsed, time.time()
        if self.fair_share is None:
            return await self._run(conn, parsed, record)
        weight, priority = self.auth.options(identity).weight, parsed.params.priority or 0
        estimate = parsed.params.n * (1 + len(parsed.extra_prompts or ())) * (parsed.params.max_tokens or 256)
        await self.fair_share.acquire(identity, weight, estimate, priority)
        try:
            return await self._run(conn, parsed, record)
        finally:
            self.fair_share.release(identity, weight, estimate, record.num_output_tokens, priority)

    async def _run(self, conn: HttpConnection, parsed: ParsedRequest, record: RequestRecord) -> int:
        """Dispatch (failing over while nothing reached the client) and answer, streamed or not."""
        identity = record.key_id
        model = self.model.name or parsed.model or "unknown"
        tried: set[int] = set()
        while True:
            if parsed.extra_prompts:
                dispatch, stream, first = await self._start_many(parsed, record)
            else:
                dispatch, stream, first = self._resumable(parsed, record, tried,
                                                          await self._start(parsed, record, tried))
            stream = self.guards.guard_stream(identity, stream, num_choices(parsed))
            if isinstance(stream, GuardedStream):
                first = stream.first(first)
            ok: bool | None = None
            try:
                if parsed.stream:
                    ok = await self._stream(conn, parsed, record, model, stream, first)
                else:
                    ok = await self._collect(conn, parsed, record, model, stream, first)
            except ReplicaError as exc:
                ok = False
                if not parsed.stream and exc.status_code >= 500:
                    # Nothing reached the client yet: the whole request can run again elsewhere.
                    tried.add(dispatch.replica.index)
                    continue
                raise OpenAIError(exc.status_code if exc.status_code >= 400 else 502, exc.message,
                                  type="server_error") from None
            finally:
                await stream.aclose()
                dispatch.finish(ok)
            status = 200 if ok else 500
            self._finish(record, status)
            return status

    async def _start_many(self, parsed: ParsedRequest, record: RequestRecord):
        """Completions with several prompts: one replica request per prompt, their outputs merged
        (choice index = prompt * n + sample). Each prompt's request resumes on its own (ResumingStream,
        with its own set of replicas tried) when its replica fails after output."""
        prompts = [parsed.prompt, *parsed.extra_prompts]
        started = []
        try:
            for i, prompt in enumerate(prompts):
                one = dataclasses.replace(parsed, prompt=prompt, extra_prompts=None)
                sub_record = RequestRecord(f"{record.request_id}-{i}", record.route, record.receive_time)
                sub_record.trace = record.trace  # each prompt's replica span joins the request's trace
                tried: set[int] = set()
                attempt = await self._start(one, sub_record, tried)
                started.append(self._resumable(one, sub_record, tried, attempt))
        except BaseException:
            for dispatch, stream, _ in started:
                await self._abandon(dispatch, stream, ok=None)
            raise
        record.routed_time, record.replica, record.attempts = time.time(), started[0][0].replica.address, 1
        record.first_output_time = record.routed_time
        merged = MergedStreams(started, parsed.params.n)
        return merged, merged, merged.first

    def _resumable(self, parsed: ParsedRequest, record: RequestRecord, tried: set[int], attempt: tuple):
        """The attempt (one prompt's request) as a ResumingStream (failover.py): when its replica fails
        after output, its unfinished samples continue on a replica not in `tried`. A non-streamed
        attempt is returned as it is: its first output is its last (final_only), and a failure before
        it is retried whole (_start, _run)."""
        if not parsed.stream:
            return attempt

        async def resume(samples: list[ResumedSample], failed: Dispatch):
            tried.add(failed.replica.index)
            return await self._start(parsed, record, tried, samples)

        max_tokens, first = parsed.params.max_tokens, attempt[2]
        if self.model.max_model_len and first.num_prompt_tokens:
            room = self.model.max_model_len - first.num_prompt_tokens
            max_tokens = room if max_tokens is None else min(max_tokens, room)
        stream = ResumingStream(resume, attempt, parsed.params.n, max_tokens)
        return stream, stream, stream.first

    async def _start(self, parsed: ParsedRequest, record: RequestRecord, tried: set[int],
                     resumed_samples: list[ResumedSample] | None = None):
        """Dispatch and wait for the first output, failing over while no byte reached the client.

        `tried` holds the replicas that already failed this request; it grows with each failure.
        resumed_samples: the unfinished samples after their delivered output, when resuming after a
        failure (failover.py).
        """
        route = RouteRequest(parsed.affinity_key, parsed.num_prompt_tokens_estimate
                             + parsed.params.n * (parsed.params.max_tokens or 256))
        while True:
            try:
                dispatch = self.router.dispatch(route, frozenset(tried))
            except NoReplicaAvailable:
                raise OpenAIError(503, "no healthy replica is available to serve the request; retry later",
                                  type="server_error", code="no_healthy_replica") from None
            record.routed_time = time.time()
            record.replica = dispatch.replica.address
            record.attempts += 1
            stream = self._generate(dispatch, parsed, record, resumed_samples)
            try:
                first = await stream.__anext__()
                record.first_output_time = time.time()
                return dispatch, stream, first
            except ReplicaUnavailable:
                tried.add(dispatch.replica.index)
                await self._abandon(dispatch, stream, ok=False)
            except ReplicaError as exc:
                await self._abandon(dispatch, stream, ok=False if exc.status_code >= 500 else None)
                raise OpenAIError(exc.status_code, exc.message,
                                  type="invalid_request_error" if exc.status_code < 500 else "server_error")
            except StopAsyncIteration:
                await self._abandon(dispatch, stream, ok=False)
                raise OpenAIError(503, "the replica ended the request without output", type="server_error")
            except BaseException:
                await self._abandon(dispatch, stream, ok=None)
                raise

    async def _complete(self, prompt: str, max_tokens: int) -> str:
        """The served model's greedy completion of a text prompt (the moderation guard's classifier)."""
        route = RouteRequest(prompt[:self.config.prefix_affinity_chars], len(prompt) // 4 + max_tokens)
        try:
            dispatch = self.router.dispatch(route, frozenset())
        except NoReplicaAvailable:
            raise GuardError("no healthy replica to ask for moderation") from None
        stream = dispatch.replica.client.generate(new_request_id(False) + "-guard", prompt,
                                                  SamplingParams(temperature=0.0, max_tokens=max_tokens),
                                                  time.time(), self.config.request_timeout_s)
        texts, ok = [], None
        try:
            async for output in stream:
                texts += [sample.text for sample in output.outputs]
            ok = True
        except ReplicaError:
            ok = False
            raise
        finally:
            await self._abandon(dispatch, stream, ok)
        return "".join(texts)

    def _generate(self, dispatch: Dispatch, parsed: ParsedRequest, record: RequestRecord,
                  resumed_samples: list[ResumedSample] | None = None):
        """The replica's output stream for the request (with its trace context when traced, after the
        delivered output when resuming, and as one output at the end when not streamed)."""
        client, args = dispatch.replica.client, (record.request_id, parsed.prompt, parsed.params,
                                                 record.receive_time, self.config.request_timeout_s)
        extra = {"resumed_samples": resumed_samples} if resumed_samples else {}
        if not parsed.stream:  # nothing leaves before the end: one message per request from the replica
            extra["final_only"] = True
        if record.trace is not None:
            extra["trace_context"] = self.tracing.carrier(record)
        return client.generate(*args, **extra)

    @staticmethod
    async def _abandon(dispatch: Dispatch, stream, ok: bool | None) -> None:
        dispatch.finish(ok)
        await stream.aclose()

    async def _stream(self, conn: HttpConnection, parsed: ParsedRequest, record: RequestRecord, model: str,
                      stream, first: RequestOutput) -> bool:
        renderer = (ResponsesRenderer if parsed.responses is not None else StreamRenderer)(
            parsed, record.request_id, created_now(), model)
        conn.start_stream(first_chunk=renderer.render(first))
        record.first_send_time = time.time()
        last = first
        tail = b""  # the finished output's events: they leave with the stream's end, in one write
        try:
            async for output in stream:
                if output.finished:
                    tail = renderer.render(output)
                else:
                    conn.write(renderer.render(output))
                last = output
                if conn.write_paused:
                    await conn.drain()
        except (ReplicaError, OpenAIError) as exc:
            error = exc if isinstance(exc, OpenAIError) else OpenAIError(exc.status_code, exc.message,
                                                                          type="server_error")
            conn.end_stream(tail + error_event(error.body()))
            self._account(record, renderer, last)
            return False
        except asyncio.CancelledError:
            if record.expired:  # the client gets an error event and the stream's end, not a cut stream
                conn.end_stream(tail + error_event(self._deadline_error().body()))
                self._account(record, renderer, last)
            raise
        conn.end_stream(tail + renderer.finish(self._timings(record, last.metrics)))
        self._account(record, renderer, last)
        return True

    async def _collect(self, conn: HttpConnection, parsed: ParsedRequest, record: RequestRecord, model: str,
                       stream, first: RequestOutput) -> bool:
        builder = (ResponsesRenderer if parsed.responses is not None else ResponseBuilder)(
            parsed, record.request_id, created_now(), model)
        builder.add(first)
        last = first
        if not first.finished:  # a final_only request's first output is its last
            async for output in stream:
                builder.add(output)
                last = output
        body = builder.render(self._timings(record, last.metrics))
        self._account(record, builder, last)
        conn.send_response(200, body)
        if last.metrics is not None and last.metrics.first_token_time:
            record.first_send_time = last.metrics.first_token_time  # no byte left earlier: the replica's TTFT
        return True

    def _deadline_error(self) -> OpenAIError:
        return OpenAIError(504, f"the request took longer than {self.config.request_timeout_s:g} s",
                           type="timeout", code="timeout")

    def _timings(self, record: RequestRecord, metrics: RequestMetrics | None) -> dict | None:
        """The scalellm_timings object, stamped now as gateway_send (None when reporting is off)."""
        return stage_timings(record, metrics, time.time()) if self.config.report_timings else None

    @staticmethod
    def _account(record: RequestRecord, counts, last: RequestOutput) -> None:
        record.num_prompt_tokens = counts.num_prompt_tokens
        record.num_output_tokens = counts.num_output_tokens
        record.replica_metrics = last.metrics
        record.finish_reason = getattr(counts, "last_finish_reason", None)

    def _send_error(self, conn: HttpConnection, error: OpenAIError, record: RequestRecord) -> int:
        if not conn.response_started:
            conn.send_response(error.status, error.body(), headers=error.headers)
        self._finish(record, error.status, error.message)
        return error.status

    def _finish(self, record: RequestRecord, status: int, error: str | None = None) -> None:
        """Count the request in the metrics and write its access-log line."""
        end = time.time()
        self.metrics.count_request(record.route, status)
        self.metrics.count_key(record.key_id, record.num_prompt_tokens, record.num_output_tokens)
        tokens_per_minute = self.auth.options(record.key_id).tokens_per_minute if record.key_id else None
        if tokens_per_minute is not None:
            self.token_limiter.charge(record.key_id, tokens_per_minute, record.num_output_tokens)
        if status == 200:
            ttft = record.first_send_time - record.receive_time if record.first_send_time else None
            self.metrics.observe_finished(ttft, end - record.receive_time, record.num_prompt_tokens,
                                          record.num_output_tokens)
            self.metrics.observe_stages(record, end)
        if record.trace is not None:
            self.tracing.end(record, status, end, error, record.parsed, self.model.name)
        if self.config.log_requests and access_log.isEnabledFor(logging.INFO):
            fields = _log_fields(record, status, end, error)
            if record.trace is not None:  # the line and the trace find each other
                fields["trace_id"] = self.tracing.trace_id(record)
            access_log.info(orjson.dumps(fields).decode())


def _expire(task: asyncio.Task, record: RequestRecord) -> None:
    record.expired = True
    task.cancel()


def _request_id(route: str) -> str:
    if route == RESPONSES:
        return "resp_" + new_request_id(True).split("-", 1)[1]
    return new_request_id(route == CHAT)


class MergedStreams:
    """Several prompts' replica streams as one: outputs re-indexed, finished when all are, and the
    dispatch interface (`finish`, `replica`) the serving loop uses."""

    def __init__(self, started: list, n: int) -> None:
        self._started = started
        self._n = n
        self.replica = started[0][0].replica
        self.first = self._merge([self._shift(i, first) for i, (_, _, first) in enumerate(started)])
        self._done = [first.finished for _, _, first in started]

    def _shift(self, prompt_index: int, output: RequestOutput) -> RequestOutput:
        for sample in output.outputs:
            sample.index += prompt_index * self._n
        return output

    @staticmethod
    def _merge(outputs: list[RequestOutput]) -> RequestOutput:
        merged = outputs[0]
        merged.outputs = [sample for output in outputs for sample in output.outputs]
        merged.num_prompt_tokens = sum(output.num_prompt_tokens for output in outputs)
        merged.finished = all(output.finished for output in outputs)
        return merged

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream) -> None:
            try:
                async for output in stream:
                    queue.put_nowait((index, output))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((index, exc))
            queue.put_nowait((index, None))

        tasks = [asyncio.create_task(pump(i, stream)) for i, (_, stream, first) in enumerate(self._started)
                 if not first.finished]
        try:
            while not all(self._done):
                index, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    self._done[index] = True
                    continue
                output = self._shift(index, item)
                output.num_prompt_tokens = 0
                output.finished = False
                yield output
        finally:
            for task in tasks:
                task.cancel()

    async def aclose(self) -> None:
        for _, stream, _ in self._started:
            await stream.aclose()

    def finish(self, ok: bool | None) -> None:
        for dispatch, _, _ in self._started:
            dispatch.finish(ok)


def stage_timings(record: RequestRecord, metrics: RequestMetrics | None, send_time: float) -> dict:
    """The request's stage timestamps (time.time() seconds; 0 = not reached) in the bench's contract.

    Keys as in scalellm/bench/breakdown.py: gateway_receive, routed, replica_receive, scheduled,
    first_token, last_token, gateway_send ("queued" is not reported by the replicas yet).
    """
    timings = {"gateway_receive": record.receive_time, "routed": record.routed_time}
    if metrics is not None:
        timings.update(replica_receive=metrics.replica_receive_time, scheduled=metrics.scheduled_time,
                       first_token=metrics.first_token_time, last_token=metrics.last_token_time)
    timings["gateway_send"] = send_time
    return timings


def _ms(since: float, moment: float | None) -> float | None:
    return round((moment - since) * 1000, 3) if moment else None


def _log_fields(record: RequestRecord, status: int, end: float, error: str | None) -> dict:
    start = record.receive_time
    stages = {"routed": _ms(start, record.routed_time)}
    metrics = record.replica_metrics
    if metrics is not None:
        stages.update(replica_receive=_ms(start, metrics.replica_receive_time),
                      scheduled=_ms(start, metrics.scheduled_time),
                      first_token=_ms(start, metrics.first_token_time),
                      last_token=_ms(start, metrics.last_token_time))
    stages["gateway_send"] = _ms(start, end)
    return {"id": record.request_id, "route": record.route, "status": status, "replica": record.replica,
            "attempts": record.attempts, "prompt_tokens": record.num_prompt_tokens,
            "completion_tokens": record.num_output_tokens,
            "ttft_ms": _ms(start, record.first_send_time), "e2e_ms": _ms(start, end),
            "stages_ms": stages, "error": error}
