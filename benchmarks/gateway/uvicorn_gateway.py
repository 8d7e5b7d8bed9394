"""The gateway's own handler served by uvicorn (httptools parser, uvloop) instead of
scalellm/gateway/http.py: the same routing, admission, replicas and rendering, another HTTP/1.1 server.
For an indicative comparison of the HTTP layer on benchmarks/gateway/ab.sh (UVICORN_SITE); not a way to
serve (no TLS, no connection limits, no header or body deadlines of ours).

    PYTHONPATH=.:UVICORN_SITE python -P benchmarks/gateway/uvicorn_gateway.py --port P --replica HOST:PORT ...
"""

from __future__ import annotations

import argparse
import asyncio
import time

import uvicorn

from scalellm.gateway.app import GatewayApp
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.http import Request


class AsgiConnection:
    """The HttpConnection methods the gateway's handler uses, over ASGI's `send`. Writes queue up and go
    out at the handler's next `drain()` (the streaming loop awaits it whenever `write_paused`) or when
    the handler returns."""

    def __init__(self, send) -> None:
        self._send = send
        self.loop = asyncio.get_running_loop()
        self._pending: list[dict] = []
        self.closed = False
        self.response_started = False

    def send_response(self, status: int, body: bytes, content_type: bytes = b"application/json",
                      headers: tuple = ()) -> None:
        self.response_started = True
        head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]
        self._pending += [{"type": "http.response.start", "status": status, "headers": head},
                          {"type": "http.response.body", "body": body}]

    def start_stream(self, status: int = 200, content_type: bytes = b"text/event-stream", headers: tuple = (),
                     first_chunk: bytes = b"") -> None:
        self.response_started = True
        head = [(b"content-type", content_type), (b"cache-control", b"no-cache"), *headers]
        self._pending += [{"type": "http.response.start", "status": status, "headers": head},
                          {"type": "http.response.body", "body": first_chunk, "more_body": True}]

    def write(self, data: bytes) -> None:
        if data:
            self._pending.append({"type": "http.response.body", "body": data, "more_body": True})

    @property
    def write_paused(self) -> bool:
        return bool(self._pending)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        for message in pending:
            await self._send(message)

    def end_stream(self, last_chunk: bytes = b"") -> None:
        self._pending.append({"type": "http.response.body", "body": last_chunk})

    def close(self) -> None:
        self.closed = True


def asgi_app(config: GatewayConfig):
    """An ASGI application that hands every HTTP request to a GatewayApp's `handle` (made at startup, on
    the server's loop, where its gRPC channels must live)."""
    gateway: GatewayApp | None = None

    async def app(scope, receive, send) -> None:
        nonlocal gateway
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    gateway = GatewayApp(config)
                    gateway.monitor.start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await gateway.monitor.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = []
        while True:
            message = await receive()
            body.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = Request(scope["method"].encode(), scope["path"], dict(scope["headers"]), b"".join(body),
                          time.time())
        conn = AsgiConnection(send)
        await gateway.handle(request, conn)
        await conn.drain()
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True)
    args = parser.parse_args()
    config = GatewayConfig(replica_addresses=tuple(args.replica), port=args.port, log_requests=False)
    uvicorn.run(asgi_app(config), host="127.0.0.1", port=args.port, http="httptools", loop="uvloop",
                log_level="warning", access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
