"""Property-based fuzzing of request parsing and of the HTTP connection's parser.

Parsing any body gives a ParsedRequest or an OpenAIError 400 with OpenAI's error JSON, never another
exception. Feeding any bytes to a connection never raises out of the protocol, and whatever it
answers is a well-formed HTTP response.
"""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalellm.gateway.http import HttpConnection, HttpLimits
from scalellm.protocol.openai import (MAX_STOP_SEQUENCES, SAMPLING_FIELDS, OpenAIError, ParsedRequest,
                                      parse_chat_request, parse_completion_request)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
FIELDS = sorted({*SAMPLING_FIELDS, "model", "messages", "prompt", "stream", "stream_options", "stop", "max_tokens",
                 "max_completion_tokens", "logprobs", "top_logprobs", "echo", "add_generation_prompt"})
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 3]),
                                 "content": JSON | st.text(max_size=30)})
BODY = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6) | st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=3), "prompt": JSON | st.text(min_size=1, max_size=10)},
    optional={name: JSON for name in FIELDS if name not in ("messages", "prompt")})


def check_parse(raw: bytes) -> None:
    for parse in (parse_chat_request, parse_completion_request):
        try:
            assert isinstance(parse(raw, 4096), ParsedRequest)
        except OpenAIError as error:
            assert error.status == 400
            shape = orjson.loads(error.body())["error"]
            assert set(shape) == {"message", "type", "param", "code"} and shape["message"]


@settings(max_examples=250, deadline=None)
@given(BODY)
def test_any_json_body_parses_or_is_a_400(body):
    check_parse(json.dumps(body).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_parse_or_are_a_400(raw):
    check_parse(raw)


@pytest.mark.parametrize("depth", [100, 5000, 500_000])
def test_deeply_nested_json_is_a_fast_400(depth):
    nested = b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"
    start = time.monotonic()
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(nested, 4096)
    assert info.value.status == 400 and time.monotonic() - start < 0.5


def test_long_stop_lists_are_refused():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert len(parse_chat_request(orjson.dumps({**body, "stop": ["x"] * MAX_STOP_SEQUENCES}), 4096).params.stop) \
        == MAX_STOP_SEQUENCES
    for stop in (["x"] * (MAX_STOP_SEQUENCES + 1), ["y" * 10_000], ["z"] * 100_000):
        with pytest.raises(OpenAIError) as info:
            parse_chat_request(orjson.dumps({**body, "stop": stop}), 4096)
        assert info.value.param == "stop"


@pytest.mark.parametrize("field,value", [("seed", 2**63), ("seed", 2**64), ("stop_token_ids", [2**32]),
                                         ("top_k", 2**31),
                                         ("n", 129), ("min_tokens", -1), ("stop_token_ids", [0] * 2000)])
def test_values_the_replicas_cannot_carry_are_a_400(field, value):
    with pytest.raises(OpenAIError) as info:
        parse_completion_request(json.dumps({"prompt": "x", field: value}).encode(), 4096)
    assert info.value.status == 400 and info.value.param in (field, None)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class _Connections:
    def add(self, connection) -> bool:
        return True

    def discard(self, connection) -> None:
        pass


async def _echo(request, conn) -> None:
    conn.send_response(200, b'{"ok":true}')


def _feed(chunks: list[bytes], max_body_bytes: int = 1024) -> bytes:
    async def run() -> bytes:
        render = lambda status, message: orjson.dumps({"error": {"message": message}})  # noqa: E731
        conn = HttpConnection(_echo, HttpLimits(max_body_bytes=max_body_bytes), render, _Connections())
        transport = FakeTransport()
        conn.connection_made(transport)
        for chunk in chunks:
            conn.data_received(chunk)
            await asyncio.sleep(0)
        for _ in range(100):  # let pipelined requests run one after the other
            await asyncio.sleep(0)
        conn.connection_lost(None)
        return bytes(transport.written)
    return asyncio.run(run())


HTTP_PIECES = st.sampled_from([
    b"GET / HTTP/1.1\r\n", b"POST /v1/completions HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 5\r\n",
    b"Content-Length: 99999\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n", b"hello", b"5\r\nhello\r\n0\r\n\r\n",
    b"Connection: close\r\n", b"Upgrade: h2c\r\nConnection: Upgrade\r\n", b"\x00\xff", b"GET"]) | st.binary(max_size=40)


@settings(max_examples=300, deadline=None)
@given(st.lists(HTTP_PIECES, max_size=12))
def test_any_bytes_on_a_connection_get_well_formed_answers(pieces):
    written = _feed(pieces)
    while written:
        assert written.startswith(b"HTTP/1.1 "), written[:60]
        head, _, rest = written.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        written = rest[length:]


def test_endless_head_is_a_431_but_a_large_body_is_not():
    endless = [b"GET / HTTP/1.1\r\n"] + [b"x-filler: " + b"a" * 1000 + b"\r\n"] * 100
    written = _feed(endless)
    assert written.startswith(b"HTTP/1.1 431 ") and written.count(b"HTTP/1.1") == 1
    body = b"b" * 8000
    request = b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    pipelined = request * 10 + b"GET / HTTP/1.1\r\n"  # 80 KB in one read, ending inside the next head
    assert _feed([pipelined, b"host: x\r\n\r\n"], max_body_bytes=10_000).count(b"HTTP/1.1 200 OK") == 11
