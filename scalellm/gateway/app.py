"""The gateway application: routes, wiring of router, health, limits and metrics, and the lifecycle.

Routes:
    POST /v1/chat/completions, POST /v1/completions, POST /v1/responses   (API key when configured)
    GET  /v1/models, GET /v1/models/{id}                                (API key when configured)
    GET  /health    200 when at least one replica is routable, the served model is known (its name
                    configured or a replica's answered) and the gateway is not draining, else 503
    GET  /metrics   Prometheus text (a key with the metrics scope when keys are configured)
    GET  /openapi.json   the OpenAPI document of these routes
/health and /openapi.json never need a key: load balancers call them without one (see auth.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
import urllib.parse
from typing import Any, Callable, Coroutine, Sequence

import orjson

from scalellm.gateway.auth import INFERENCE, METRICS, ApiKeyAuth
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.guards import GuardPolicy
from scalellm.gateway.health import HealthMonitor
from scalellm.gateway.http import HttpConnection, HttpLimits, Request, start_http_server
from scalellm.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from scalellm.gateway.metrics import GatewayMetrics
from scalellm.gateway.openapi import openapi_document
from scalellm.gateway.policies import create_policy
from scalellm.gateway.router import Router
from scalellm.gateway.serving import ROUTES, InferenceService, ModelInfo
from scalellm.process import freeze_loaded_objects
from scalellm.protocol.openai import OpenAIError

logger = logging.getLogger("scalellm.gateway")

_METHODS = {"/v1/chat/completions": b"POST", "/v1/completions": b"POST", "/v1/responses": b"POST",
            "/v1/models": b"GET",
            "/health": b"GET", "/metrics": b"GET", "/openapi.json": b"GET"}


def render_error(status: int, message: str) -> bytes:
    """OpenAI's error JSON for errors raised below the application (malformed HTTP, 413)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIError(status, message, type=kind).body()


def ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The HTTPS listener's TLS context, None for plain HTTP. ValueError naming a file that does not load."""
    if config.ssl_certfile is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load the TLS certificate {config.ssl_certfile} with key {config.ssl_keyfile}: "
                         f"{error}") from None
    return context


def default_client_factory(config: GatewayConfig) -> Callable[[str], object]:
    """Build gRPC replica clients (imported here so tests can run with fake replicas only)."""
    from scalellm.rpc.client import ReplicaClient

    return lambda address: ReplicaClient(address, connect_timeout_s=config.connect_timeout_s,
                                         secret=config.replica_secret)


class GatewayApp:
    """One gateway: an HTTP server in front of the replicas. `start()`, then `shutdown()`."""

    def __init__(self, config: GatewayConfig, clients: Sequence | None = None) -> None:
        self.config = config
        if clients is None:
            make_client = default_client_factory(config)
            clients = [make_client(address) for address in config.replica_addresses]
        if not clients:
            raise ValueError("the gateway needs at least one replica address")
        self.metrics = GatewayMetrics()
        policy = create_policy(config.routing_policy, load_bound=config.prefix_affinity_load_bound)
        self.router = Router(clients, policy, self.metrics, config.breaker_failure_threshold,
                             config.breaker_cooldown_s)
        self.model = ModelInfo(config.served_model_name)
        auth = ApiKeyAuth(config.api_keys, config.api_key_file)
        guards = GuardPolicy(config.guards, auth.key_guards(), self.metrics.count_guard)
        self.service = InferenceService(config, self.router, self.metrics, auth, self.model, guards)
        self.monitor = HealthMonitor(self.router, self.metrics, config.health_interval_s,
                                     config.health_timeout_s, on_info=self._learn_model)
        self._start_tracing()
        self._server: asyncio.base_events.Server | None = None
        self._created = int(time.time())

    def _start_tracing(self) -> None:
        """Trace requests when an OTLP endpoint is configured (flag or OTEL_* variables)."""
        from scalellm.tracing import start_tracing, tracing_config

        tracing = start_tracing(tracing_config(self.config.otlp_traces_endpoint, "scalellm-gateway"))
        if tracing is not None:
            from scalellm.gateway.tracing import GatewayTracing

            self.service.tracing = GatewayTracing(tracing, self.metrics.spans_dropped.inc)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the config asked for port 0)."""
        return self._server.sockets[0].getsockname()[1]

    def _learn_model(self, name: str, max_model_len: int) -> None:
        if self.model.name is None:
            self.model.name = name
        if self.model.max_model_len is None or max_model_len < self.model.max_model_len:
            self.model.max_model_len = max_model_len

    async def start(self) -> None:
        """Probe the replicas once, then listen and keep probing them. The first round comes before the
        first request: it learns the model's name, which /v1/models lists and requests must name."""
        await self.monitor.probe_all()
        config = self.config
        limits = HttpLimits(config.max_body_bytes, config.max_connections, config.header_timeout_s,
                            config.body_timeout_s, config.keep_alive_timeout_s)
        self._server = await start_http_server(self.handle, config.host, config.port, limits, render_error,
                                               ssl_context=ssl_context(config))
        self.monitor.start()
        logger.info("gateway listening on %s://%s:%d, replicas: %s", config.scheme, config.host, self.port,
                    ", ".join(r.address for r in self.router.replicas))

    async def shutdown(self) -> None:
        """Stop admitting (503), wait for in-flight requests up to drain_timeout_s, then close everything."""
        self.service.draining = True
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self.service.gate.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.service.gate.num_in_flight:
            logger.warning("drain timeout: %d requests still in flight", self.service.gate.num_in_flight)
        self._server.close()
        await self.monitor.stop()
        if self.service.tracing is not None:  # the last spans, with a bounded wait for the collector
            await asyncio.get_running_loop().run_in_executor(None, self.service.tracing.shutdown)
        for state in self.router.replicas:
            await state.client.close()
        await self.service.guards.close()

    async def handle(self, request: Request, conn: HttpConnection) -> None:
        """Route one HTTP request."""
        path = request.path
        model_id = None
        if path.startswith("/v1/models/"):
            path, model_id = "/v1/models", urllib.parse.unquote(path[len("/v1/models/"):])
        method = _METHODS.get(path)
        if method is None:
            return self._error(conn, OpenAIError(404, f"no route {path}; see /v1/chat/completions, "
                                                 "/v1/completions, /v1/responses, /v1/models",
                                                 code="not_found"), "other")
        if request.method != method:
            error = OpenAIError(405, f"{path} accepts only {method.decode()}", code="method_not_allowed",
                                headers=((b"allow", method),))
            return self._error(conn, error, path)
        if path in ROUTES:
            await self.service.handle(request, conn, path)
        elif path == "/v1/models":
            self._models(request, conn, model_id)
        elif path == "/health":
            self._health(conn)
        elif path == "/openapi.json":
            conn.send_response(200, orjson.dumps(openapi_document(self.model.name, self.model.max_model_len,
                                                                  self.service.auth.enabled)))
        else:
            self._metrics(request, conn)

    def _error(self, conn: HttpConnection, error: OpenAIError, route: str) -> None:
        conn.send_response(error.status, error.body(), headers=error.headers)
        self.metrics.count_request(route, error.status)

    def _metrics(self, request: Request, conn: HttpConnection) -> None:
        try:
            self.service.auth.authorize(request.headers.get(b"authorization"), METRICS)
        except OpenAIError as error:
            return self._error(conn, error, "/metrics")
        conn.send_response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def _models(self, request: Request, conn: HttpConnection, model_id: str | None = None) -> None:
        """GET /v1/models, or /v1/models/{id} (404 in OpenAI's format for another id)."""
        try:
            self.service.auth.authorize(request.headers.get(b"authorization"), INFERENCE)
        except OpenAIError as error:
            return self._error(conn, error, "/v1/models")
        data = []
        if self.model.name is not None:
            data.append({"id": self.model.name, "object": "model", "created": self._created,
                         "owned_by": "scalellm", "max_model_len": self.model.max_model_len})
        if model_id is not None:
            if not data or model_id != self.model.name:
                return self._error(conn, OpenAIError(404, f"the model '{model_id}' does not exist; this server "
                                                     f"serves '{self.model.name}'", param="model",
                                                     code="model_not_found"), "/v1/models")
            conn.send_response(200, orjson.dumps(data[0]))
        else:
            conn.send_response(200, orjson.dumps({"object": "list", "data": data}))
        self.metrics.count_request("/v1/models", 200)

    def _health(self, conn: HttpConnection) -> None:
        num_healthy = sum(1 for state in self.router.replicas if state.routable)
        # Ready once the model is known too: a client that saw 200 may list /v1/models at once.
        ok = num_healthy > 0 and not self.service.draining and self.model.name is not None
        body = {"status": "ok" if ok else "unavailable", "healthy_replicas": num_healthy,
                "replicas": len(self.router.replicas), "draining": self.service.draining}
        conn.send_response(200 if ok else 503, orjson.dumps(body))


async def serve_until_signalled(config: GatewayConfig, clients: Sequence | None = None,
                                on_started: Callable[[GatewayApp], None] | None = None) -> None:
    """Run a gateway until SIGTERM or SIGINT, then drain and return.

    `clients` replaces the gRPC clients of `config.replica_addresses` (the in-process replica of
    `scalellm serve --no-gateway`); `on_started` is called once the HTTP server listens.
    """
    app = GatewayApp(config, clients)
    await app.start()
    if on_started is not None:
        on_started(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("signal received: draining for up to %g s", config.drain_timeout_s)
    await app.shutdown()


def run_gateway(config: GatewayConfig) -> None:
    """Run the gateway in this process until SIGTERM/SIGINT (blocking); uses uvloop."""
    run_gateway_process(serve_until_signalled(config))


def run_gateway_process(main: Coroutine[Any, Any, None]) -> None:
    """A gateway process's main coroutine on uvloop (blocking), after logging's setup, with what the
    imports made kept out of the garbage collector's passes (it lives as long as the process)."""
    import uvloop

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    freeze_loaded_objects()
    uvloop.run(main)
