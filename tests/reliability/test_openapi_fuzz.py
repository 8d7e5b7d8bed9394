"""schemathesis fuzzes every route of a live gateway (`scalellm serve --engine mock`) from its own
/openapi.json: no 5xx, no hang, every response as documented, every error in OpenAI's format, and
input that the document forbids is refused."""

from __future__ import annotations

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from procs import MOCK, Serve, http, wait_until
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (content_type_conformance, negative_data_rejection,
                                               response_schema_conformance, status_code_conformance)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CALL_TIMEOUT_S = 10.0
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 100}


@pytest.fixture(scope="module")
def served_schema():
    serve = Serve(*MOCK, "--tpot-ms", "0", "--replicas", "1", "--max-model-len", "64", "--max-queue", "64")
    try:
        schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{serve.port}/openapi.json")
        yield serve, schema
    finally:
        serve.stop()


def openai_error_format(ctx, response, case) -> None:
    """Every 4xx body is OpenAI's error object with a message (but /health's 503, documented as the
    health object: a replica that misses its health checks on a loaded machine makes one)."""
    if response.status_code >= 400 and not (case.path == "/health" and response.status_code == 503):
        error = orjson.loads(response.content).get("error")
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, response.content
        assert isinstance(error["message"], str) and error["message"]


def not_a_server_error(ctx, response, case) -> None:
    assert response.status_code < 500 or response.status_code == 503, (response.status_code, response.content)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          openai_error_format]


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def test_document_covers_every_route(served_schema):
    serve, schema = served_schema
    routes = {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
              ("GET", "/v1/models"), ("GET", "/v1/models/{model}"), ("GET", "/health"), ("GET", "/metrics")}
    assert {(op.method.upper(), op.path) for op in _operations(schema)} == routes  # it skips the document's own
    document = orjson.loads(http(serve.port, "GET", "/openapi.json")[1])
    assert {(method.upper(), path) for path, item in document["paths"].items() for method in item} \
        == routes | {("GET", "/openapi.json")}
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["max_tokens"]["anyOf"][0]["maximum"] == 64  # the replicas' context length
    assert chat["properties"]["model"]["anyOf"][0]["enum"] == ["mock"]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schemathesis_fuzzes_every_route(served_schema, mode):
    serve, schema = served_schema
    statuses: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    refusals: list[str] = []
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    for operation in _operations(schema):
        if mode == GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # the GET routes take no input to make invalid

        # Derandomized, so that a failure replays.
        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            response = case.call(timeout=CALL_TIMEOUT_S)
            statuses.setdefault(operation.label, set()).add(response.status_code)
            counts[operation.label] = counts.get(operation.label, 0) + 1
            if response.status_code == 400:
                refusals.append(orjson.loads(response.content)["error"]["message"])
            case.validate_response(response, checks=checks)
        run()
    assert statuses, "schemathesis sent nothing"
    print(f"schemathesis {mode.value}: " + ", ".join(f"{label} {counts[label]} cases -> {sorted(codes)}"
                                                     for label, codes in statuses.items()))
    if mode == GenerationMode.POSITIVE:
        # The document states every rule but these: prompt plus max_tokens must fit the context, which
        # depends on the prompt's tokens; a prompt must be at least one token (a blank one is none to the
        # mock's whitespace tokenizer); prompt token ids must be in the model's vocabulary and a suffix
        # needs fill-in-the-middle markers in it, which only the replica knows; a structured-output grammar
        # (or structured_outputs.json's text) must compile; a named tool_choice must name one of the tools;
        # tool names must differ (JSON Schema cannot compare values). The generator also does not always
        # honour the document's `not` (response_format with structured_outputs). A body it allows is
        # refused for those only.
        allowed = ("context", "the prompt is empty", "prompt token ids must be integers in",
                   "does not support fill-in-the-middle", "invalid grammar", "invalid regex",
                   "invalid json_schema", "invalid choice", "did not compile", "which is not in 'tools'",
                   "more than once", "not both")
        unexpected = [m for m in refusals if not any(reason in m for reason in allowed)]
        assert not unexpected, unexpected
        assert all(200 in statuses[label] for label in ("POST /v1/chat/completions", "POST /v1/completions"))
    else:
        assert all(400 in codes and codes <= {400, 404} for codes in statuses.values()), statuses  # 404: a model


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_streams_and_bodies_conform_to_the_document(served_schema, route):
    """Streamed and whole responses of both routes, every time (the fuzzer may not draw stream=true)."""
    serve, schema = served_schema
    # After the fuzzer's load a replica that missed its health checks (see openai_error_format) is
    # back within seconds: these calls are about the responses' shapes, so they start once it is.
    wait_until(lambda: http(serve.port, "GET", "/health")[0] == 200, 30, "a healthy replica")
    operation = schema[route]["POST"]
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {"prompt": "hi"}
    for extra in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}, {}):
        case = operation.Case(body={**prompt, "max_tokens": 3, **extra}, media_type="application/json")
        response = case.call(timeout=CALL_TIMEOUT_S)
        assert response.status_code == 200
        case.validate_response(response, checks=CHECKS)
