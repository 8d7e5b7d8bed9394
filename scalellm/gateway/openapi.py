"""The gateway's OpenAPI 3.1 document, served at /openapi.json.

Request schemas come from the definitions the parser itself checks against (`SAMPLING_FIELDS`,
`STOP_SCHEMA`, the roles and limits of scalellm/protocol/openai.py), so the document cannot drift from
what the gateway accepts; the model name and context length are filled in from the replicas. Every
error is documented with OpenAI's error object. Null means "the default" for every optional field.
"""

from __future__ import annotations

from scalellm.gateway.openapi_agents import (chat_agent_properties, chat_agent_rules, chat_message_response,
                                             chat_message_schema, completion_rules, ignored_properties,
                                             responses_paths, router_properties, structured_properties)
from scalellm.protocol.openai import (MAX_N, MAX_PROMPTS, MAX_TOKEN_ID, MAX_TOKENS_WITHOUT_CONTEXT,
                                      SAMPLING_FIELDS, STOP_SCHEMA)
from scalellm.protocol.types import SamplingParams

_ERROR_STATUSES = {"400": "Invalid request", "401": "Missing or invalid API key",
                   "403": "The API key lacks the route's scope", "404": "Unknown model",
                   "405": "Wrong method", "408": "The request did not arrive in time",
                   "413": "Request body too large", "429": "Rate limit or in-flight limit reached",
                   "431": "Request head too large", "503": "No healthy replica, or the gateway is draining",
                   "504": "The request timed out"}
_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_SSE_EVENT = {"type": "object", "required": ["data"], "description": "data: a chunk's JSON, an error's JSON, or [DONE]",
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {name: {"type": "integer", "minimum": 0}
                         for name in ("prompt_tokens", "completion_tokens", "total_tokens")}}


def _needs_true(field: str, flag: str) -> dict:
    """A rule: a body with a non-null `field` must also say `flag`: true."""
    return {"if": {"required": [field], "properties": {field: {"not": {"type": "null"}}}},
            "then": {"required": [flag], "properties": {flag: {"const": True}}}}


def _nullable(schema: dict) -> dict:
    """`schema` or null (the parser reads null as the field's default)."""
    return {"anyOf": [schema, {"type": "null"}]}


def _common_properties(max_tokens: int, model: str | None) -> dict:
    properties = {name: _nullable(schema) for name, (schema, _) in SAMPLING_FIELDS.items()}
    properties["model"] = _nullable({"type": "string", "enum": [model]} if model else {"type": "string"})
    properties["max_tokens"] = _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens})
    properties["stop"] = _nullable(STOP_SCHEMA)
    properties["stream"] = _nullable({"type": "boolean"})
    properties["stream_options"] = _nullable({"type": "object", "properties": {
        "include_usage": _nullable({"type": "boolean"})}})
    properties.update(structured_properties(), **ignored_properties(), **router_properties())
    return properties


def _chat_request(max_tokens: int, model: str | None) -> dict:
    properties = _common_properties(max_tokens, model)
    properties.update(
        messages={"type": "array", "minItems": 1, "items": chat_message_schema()},
        max_completion_tokens=properties["max_tokens"],
        logprobs=_nullable({"type": "boolean"}),
        top_logprobs=_nullable({"type": "integer", "minimum": 0, "maximum": SamplingParams.MAX_LOGPROBS}),
        add_generation_prompt=_nullable({"type": "boolean"}), **chat_agent_properties())
    return {"type": "object", "required": ["messages"], "properties": properties, "additionalProperties": False,
            "allOf": [_needs_true("stream_options", "stream"), _needs_true("top_logprobs", "logprobs"),
                      *chat_agent_rules()]}


def _completion_request(max_tokens: int, model: str | None) -> dict:
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}}
    text = {"type": "string", "minLength": 1}
    properties = _common_properties(max_tokens, model)
    properties.update(
        prompt={"anyOf": [text, token_ids, {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
                                            "items": {"anyOf": [text, token_ids]}}]},
        logprobs=_nullable({"type": "integer", "minimum": 0, "maximum": SamplingParams.MAX_LOGPROBS}),
        echo=_nullable({"type": "boolean"}), suffix=_nullable({"type": "string"}),
        best_of=_nullable({"type": "integer", "minimum": 1, "maximum": MAX_N,
                           "description": "accepted when equal to n (no reranking)"}))
    return {"type": "object", "required": ["prompt"], "properties": properties, "additionalProperties": False,
            "allOf": [_needs_true("stream_options", "stream"), *completion_rules()]}


def _completion_response(chat: bool) -> dict:
    if chat:
        choice = {"type": "object", "required": ["index", "message", "finish_reason"], "properties": {
            "index": {"type": "integer"}, "finish_reason": {"type": ["string", "null"]},
            "message": chat_message_response()}}
    else:
        choice = {"type": "object", "required": ["index", "text", "finish_reason"], "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]}}}
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                           "created": {"type": "integer"}, "model": {"type": "string"},
                           "choices": {"type": "array", "minItems": 1, "items": choice,
                                       "maxItems": MAX_N if chat else MAX_N * MAX_PROMPTS},  # n per prompt
                           "usage": _USAGE}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict:
    return {status: _json({"$ref": "#/components/schemas/Error"}, _ERROR_STATUSES[status]) for status in statuses}


def _operation(summary: str, responses: dict, secured: bool, body: dict | None = None) -> dict:
    operation = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if secured:
        operation["security"] = [{"bearer": []}]
    return operation


def _generation(summary: str, chat: bool, body: dict, auth: bool) -> dict:
    ok = _json(_completion_response(chat), "The completion (stream=false)")
    ok["content"]["text/event-stream"] = {"schema": {"anyOf": [_SSE_EVENT, {"type": "array", "items": _SSE_EVENT}]}}
    statuses = ("400", "401", "403", "404", "405", "408", "413", "429", "431", "503", "504")
    return {"post": _operation(summary, {"200": ok, **_errors(*statuses)}, auth, body)}


def openapi_document(model: str | None, max_model_len: int | None, auth_enabled: bool) -> dict:
    """The OpenAPI document of this gateway's routes (security only when API keys are configured)."""
    max_tokens = max_model_len or MAX_TOKENS_WITHOUT_CONTEXT
    models = {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}}}}}}
    health = {"type": "object", "required": ["status", "healthy_replicas", "replicas", "draining"],
              "properties": {"status": {"enum": ["ok", "unavailable"]}, "healthy_replicas": {"type": "integer"},
                             "replicas": {"type": "integer"}, "draining": {"type": "boolean"}}}
    metrics = {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
    paths = {
        "/v1/chat/completions": _generation("Chat completion", True, _chat_request(max_tokens, model),
                                            auth_enabled),
        "/v1/completions": _generation("Text completion", False, _completion_request(max_tokens, model),
                                       auth_enabled),
        "/v1/models": {"get": _operation("The served model", {"200": _json(models, "Models"),
                                                              **_errors("401", "403", "405")}, auth_enabled)},
        "/v1/models/{model}": {"get": {**_operation("One model", {
            "200": _json(models["properties"]["data"]["items"], "The model"),
            **_errors("401", "403", "404", "405")}, auth_enabled), "parameters": [
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        **responses_paths(max_tokens, model, _operation, _json, _errors, auth_enabled),
        "/health": {"get": _operation("Gateway health (no key needed)", {
            "200": _json(health, "At least one replica is routable"),
            "503": _json(health, "No routable replica, or draining"), **_errors("405")}, False)},
        "/metrics": {"get": _operation("Prometheus metrics (metrics scope)",
                                       {"200": metrics, **_errors("401", "403", "405")}, auth_enabled)},
        "/openapi.json": {"get": _operation("This document (no key needed)", {
            "200": _json({"type": "object"}, "OpenAPI 3.1 document"), **_errors("405")}, False)},
    }
    document = {"openapi": "3.1.0", "info": {"title": "ScaleLLM gateway", "version": "1"}, "paths": paths,
                "components": {"schemas": {"Error": _ERROR}}}
    if auth_enabled:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document
