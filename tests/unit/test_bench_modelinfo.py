"""The bench learns the served model from /v1/models, waiting for a server that lists none yet."""

from __future__ import annotations

import http.server
import threading

import orjson
import pytest

from scalellm.bench.modelinfo import model_entry


def _server(listings: list[list[dict]]):
    """An HTTP server whose /v1/models answers each listing in turn, then the last one again."""
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls.append(self.path)
            body = orjson.dumps({"object": "list", "data": listings[min(len(calls), len(listings)) - 1]})
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, calls


def test_waits_while_the_list_is_empty():
    server, calls = _server([[], [], [{"id": "m", "weight_format": "gguf"}]])
    try:
        entry = model_entry(f"http://127.0.0.1:{server.server_port}", wait_s=10)
    finally:
        server.shutdown()
    assert entry == {"id": "m", "weight_format": "gguf"} and len(calls) == 3


def test_an_empty_list_past_the_wait_is_an_error():
    server, calls = _server([[]])
    try:
        with pytest.raises(RuntimeError, match="lists no model"):
            model_entry(f"http://127.0.0.1:{server.server_port}", wait_s=0.6)
    finally:
        server.shutdown()
    assert 2 <= len(calls) <= 3
