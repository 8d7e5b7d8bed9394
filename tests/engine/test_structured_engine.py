"""Structured outputs through the whole engine: a random tiny model must still follow the grammar."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading

import pytest

from scalellm.config import EngineConfig
from scalellm.engine.llm_engine import LLMEngine
from scalellm.engine.structured import GrammarCompileError
from scalellm.protocol.types import SamplingParams, StructuredOutput
from tests.engine.tiny_models import make_tiny_model

pytest.importorskip("xgrammar")

PROMPT = [5, 100, 2000, 300, 41, 7777, 12]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}, "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tokenizer_dir):
    directory = str(tmp_path_factory.mktemp("llama-structured"))
    make_tiny_model("llama", directory, tokenizer_dir, seed=0)
    return LLMEngine(EngineConfig(model=directory, dtype="float32", kv_cache_gib=0.01, block_size=4))


def run(engine: LLMEngine, requests: dict[str, SamplingParams]) -> dict[str, object]:
    for request_id, params in requests.items():
        engine.add_request(request_id, PROMPT, params)
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
    return results


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_model_follows_schema_regex_and_choice(engine, temperature):
    structured = {
        "schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
        "regex": StructuredOutput("regex", r"[a-c]{2,4}-\d{2}"),
        "choice": StructuredOutput("choice", json.dumps(["red", "green", "blue"])),
        "object": StructuredOutput("json_object"),
        "free": None,
    }
    requests = {name: SamplingParams(temperature=temperature, seed=3, max_tokens=120, structured=s)
                for name, s in structured.items()}
    results = run(engine, requests)
    texts = {name: output.outputs[0].text for name, output in results.items()}
    finish = {name: output.outputs[0].finish_reason for name, output in results.items()}
    assert finish["schema"] == "stop", texts["schema"]
    value = json.loads(texts["schema"])
    assert set(value) == {"name", "age", "ok"} and isinstance(value["age"], int), texts["schema"]
    assert re.fullmatch(r"[a-c]{2,4}-\d{2}", texts["regex"]), texts["regex"]
    assert texts["choice"] in ("red", "green", "blue")
    assert finish["schema"] == finish["regex"] == finish["choice"] == "stop"
    if finish["object"] == "stop":
        assert isinstance(json.loads(texts["object"]), dict)
    assert structured["free"] is None and texts["free"]  # an unconstrained row in the same batches


def test_grammar_that_cannot_finish_ends_with_length(engine):
    params = SamplingParams(temperature=0.0, max_tokens=5, structured=StructuredOutput("regex", "a{50}"))
    output = run(engine, {"long": params})["long"].outputs[0]
    assert output.finish_reason == "length"
    assert len(output.token_ids) == 5 and set(output.text) <= {"a"}


@pytest.mark.parametrize("structured", [
    StructuredOutput("json_schema", "{not json"),
    StructuredOutput("regex", "(unclosed"),
    StructuredOutput("grammar", "root ::= missing_rule"),
    StructuredOutput("choice", "[]"),
])
def test_invalid_specs_are_value_errors_and_engine_keeps_serving(engine, structured):
    with pytest.raises(GrammarCompileError):
        engine.add_request("bad", PROMPT, SamplingParams(max_tokens=3, structured=structured))
    assert not engine.has_unfinished_requests()
    assert run(engine, {"after": SamplingParams(temperature=0.0, max_tokens=3)})["after"].outputs[0].token_ids


def test_repeat_compile_is_cached(engine):
    cache = engine.grammars.get()
    spec = StructuredOutput("json_schema", json.dumps({**SCHEMA, "title": "cached"}))
    first = cache.compile_blocking(spec)
    assert cache.compile_blocking(spec) is first


def test_a_compile_done_before_its_callback_is_attached_does_not_deadlock(engine):
    """The pool may finish a compile before the submitting thread attaches its done callback, which
    then runs at once in that thread: a pool that runs the compile inline makes that race certain."""
    cache = engine.grammars.get()

    class InlinePool:
        def submit(self, fn, *args):
            future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

    pool, cache._pool = cache._pool, InlinePool()
    try:
        spec = StructuredOutput("regex", r"[a-c]{2,5}-inline")
        result = []
        worker = threading.Thread(target=lambda: result.append(cache.compile_blocking(spec)), daemon=True)
        worker.start()
        worker.join(timeout=60)
        assert result, "compile_blocking did not return: the done callback deadlocked on the cache's lock"
        assert cache.compile_blocking(spec) is result[0]  # stored by the callback
    finally:
        cache._pool = pool


@pytest.fixture(scope="module")
def smollm():
    from scalellm.engine.loader import default_model_path

    return LLMEngine(EngineConfig(model=default_model_path(), kv_cache_gib=0.05, max_model_len=512))


@pytest.mark.slow
def test_default_model_answers_json_when_the_grammar_forces_it(smollm):
    from scalellm.protocol.types import ChatPrompt

    chat = ChatPrompt([{"role": "user", "content": "Describe a cat."}])
    params = SamplingParams(temperature=0.0, max_tokens=60, structured=StructuredOutput(
        "json_schema", json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                                    "legs": {"type": "integer", "maximum": 8}},
                                   "required": ["name", "legs"], "additionalProperties": False})))
    smollm.add_request("json", chat, params)
    final = None
    while smollm.has_unfinished_requests():
        final = next((o for o in smollm.step() if o.finished), final)
    value = json.loads(final.outputs[0].text)
    assert set(value) == {"name", "legs"}
    with pytest.raises(ValueError, match="cannot render tools"):
        smollm.add_request("tools", ChatPrompt(chat.messages, tools=[{"type": "function", "function": {"name": "f"}}]),
                           SamplingParams(max_tokens=4))
