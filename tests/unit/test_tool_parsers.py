"""Tool-call parsers and the choice stream: whole, one character at a time, and random bursts agree."""

from __future__ import annotations

import json
import random

import pytest

from scalellm.protocol.choice_stream import ChoiceStream, assemble, split_reasoning
from scalellm.protocol.tool_parsers import TOOL_PARSERS, get_tool_parser, tool_parser_for_model

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris, \\"FR\\"", "days": [1, {"x": "}"}]}}'
RECORDED = {
    "hermes": [
        ("plain answer, no call", "plain answer, no call", []),
        (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", '{"city": "Paris, \\"FR\\"", "days": [1, {"x": "}"}]}')]),
        ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
         '{"name": "b", "arguments": {"q": "<tool_call>"}}\n</tool_call>', "Let me check.\n",
         [("a", "{}"), ("b", '{"q": "<tool_call>"}')]),
        ('<tool_call>\n{"arguments": {"k": 1}, "name": "late"}\n</tool_call>', "", [("late", '{"k": 1}')]),
        ('<tool_call>\n{"name": "cut", "arguments": {"k": "unfinish', "", [("cut", '{"k": "unfinish')]),
        ("<think>step 1 <tool_call> not a call</think>\nanswer <tool_", "answer <tool_", []),
        ("a < b and <tool> is not a call", "a < b and <tool> is not a call", []),
    ],
    "llama3_json": [
        ("Sure: no tools here.", "Sure: no tools here.", []),
        ('{"name": "f", "parameters": {"a": "b;c"}}; {"name": "g", "parameters": {}}', "",
         [("f", '{"a": "b;c"}'), ("g", "{}")]),
        ('<|python_tag|>{"name": "f", "parameters": {"n": 1}}', "", [("f", '{"n": 1}')]),
        ("  {not json at all", "", []),
    ],
    "mistral": [
        ("Hello there", "Hello there", []),
        ('[TOOL_CALLS][{"name": "f", "arguments": {"x": [1, 2]}}, {"name": "g", "arguments": {}}]</s>', "",
         [("f", '{"x": [1, 2]}'), ("g", "{}")]),
        ('Checking. [TOOL_CALLS] [{"name": "f", "arguments": {"s": "]"}}]', "Checking. ", [("f", '{"s": "]"}')]),
    ],
}


def chunkings(text: str, seed: int):
    yield "whole", [text]
    yield "chars", list(text)
    rng = random.Random(seed)
    for attempt in range(5):
        pieces, i = [], 0
        while i < len(text):
            size = rng.randint(1, 12)
            pieces.append(text[i:i + size])
            i += size
        yield f"bursts{attempt}", pieces


def run(parser_name: str | None, pieces: list[str]):
    stream = ChoiceStream(get_tool_parser(parser_name) if parser_name else None)
    deltas = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    content, reasoning, calls = assemble(deltas)
    return content, reasoning, [(c["function"]["name"], c["function"]["arguments"]) for c in calls], deltas


@pytest.mark.parametrize("parser_name,case", [(p, i) for p, cases in RECORDED.items() for i in range(len(cases))])
def test_every_chunking_assembles_the_same_calls_and_text(parser_name, case):
    text, expected_content, expected_calls = RECORDED[parser_name][case]
    results = {}
    for label, pieces in chunkings(text, seed=case):
        content, _, calls, deltas = run(parser_name, pieces)
        results[label] = (content, calls)
        for delta in deltas:  # OpenAI's delta shape: id, type and name first, then argument fragments
            for call in delta.tool_calls:
                assert set(call) in ({"index", "id", "type", "function"}, {"index", "function"})
    assert results["whole"] == (expected_content, expected_calls)
    assert all(result == results["whole"] for result in results.values()), results


def test_reasoning_goes_to_its_own_deltas_never_to_tool_parsing():
    text = "<think>maybe <tool_call>{}</tool_call></think>\n<tool_call>\n" + WEATHER + "\n</tool_call>"
    for label, pieces in chunkings(text, seed=7):
        content, reasoning, calls, _ = run("hermes", pieces)
        assert reasoning == "maybe <tool_call>{}</tool_call>", label
        assert content == "" and [name for name, _ in calls] == ["get_weather"], label


def test_split_reasoning_holds_back_partial_markers():
    assert split_reasoning("<thi", final=False) == ("", "", False)
    assert split_reasoning("<think>abc</th", final=False)[0] == "abc"
    assert split_reasoning("hello", final=False) == ("", "hello", True)


def test_arguments_stream_in_fragments_after_the_name():
    stream = ChoiceStream(get_tool_parser("hermes"))
    first = stream.feed('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert first.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": '}
    second = stream.feed('1}}\n</tool_call>')
    assert second.tool_calls == [{"index": 0, "function": {"arguments": "1}"}}]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_structural_tags_name_every_tool(name):
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    tag = json.dumps(get_tool_parser(name).structural_tag(tools, parallel=False))
    assert '\\"a\\"' in tag and '\\"b\\"' in tag and '"stop_after_first": true' in tag


def test_parser_registry():
    assert tool_parser_for_model("Qwen2.5-Coder-1.5B-Instruct") == "hermes"
    assert tool_parser_for_model("Meta-Llama-3.1-8B-Instruct") == "llama3_json"
    assert tool_parser_for_model("Mistral-7B-Instruct-v0.3") == "mistral"
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
