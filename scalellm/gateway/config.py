"""Gateway configuration: one frozen dataclass, validated at construction, with a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.gateway.auth import parse_key_line


@dataclass(frozen=True)
class GatewayConfig:
    """Everything that shapes one gateway process. The CLI maps its flags onto these fields."""

    replica_addresses: tuple[str, ...] = ()
    """HOST:PORT of each replica's gRPC server."""
    host: str = "127.0.0.1"
    """Interface the HTTP server binds to: loopback only unless another address is asked for explicitly."""
    port: int = 8000
    """TCP port of the HTTP server."""
    served_model_name: str | None = None
    """Model name clients must send; None asks the replicas (`info()`) for theirs."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Accepted API keys as `KEY` or `KEY SCOPE[,SCOPE...]` (scopes: inference, metrics, admin; a bare
    key is inference). Held only as sha256 digests once the app starts; never in the repr or the logs."""
    api_key_file: str | None = None
    """A file with one key per line in the same syntax (blank lines and lines starting with # are skipped)."""
    routing_policy: str = "least_load"
    """Name of a registered routing policy: round_robin, least_load or prefix_affinity."""
    rate_limit_rpm: float | None = None
    """Requests per minute per API key (token bucket, burst of one minute's worth); None disables it."""
    max_queue: int = 1024
    """Most inference requests in flight in the gateway; beyond it requests get a fast 429."""
    max_concurrent: int | None = None
    """Most requests sent to the replicas at once; beyond it requests wait and are let through by weighted
    fair share of generated tokens between API keys (weight= in the key file) instead of first come first
    served. None: no limit. Set it near the replicas' total batch size (max_num_seqs x replicas)."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest accepted request body; larger ones get 413 before the gateway reads them."""
    max_connections: int = 4096
    """Most open client connections; a connection beyond it gets a 503 and is closed at once."""
    header_timeout_s: float = 10.0
    """A request's line and headers must arrive within this many seconds of its first byte (else 408)."""
    body_timeout_s: float = 30.0
    """A request's body must arrive within this many seconds of its headers (else 408)."""
    keep_alive_timeout_s: float = 60.0
    """An open connection with no request in progress is closed after this many idle seconds."""
    request_timeout_s: float = 600.0
    """Wall-clock limit of one inference request, streaming included."""
    drain_timeout_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight requests may still run before the gateway exits."""
    health_interval_s: float = 2.0
    """Seconds between active health and load probes of each replica."""
    health_timeout_s: float = 1.0
    """Deadline of one health or load probe."""
    connect_timeout_s: float = 2.0
    """Deadline for connecting to a replica."""
    breaker_failure_threshold: int = 3
    """Consecutive failures (probes or requests) that open a replica's circuit breaker."""
    breaker_cooldown_s: float = 5.0
    """How long an open breaker keeps a replica out of routing before it is tried again (half-open)."""
    prefix_affinity_chars: int = 256
    """Leading prompt characters hashed by the prefix_affinity policy."""
    prefix_affinity_load_bound: int = 4096
    """prefix_affinity leaves the preferred replica when its tokens in flight exceed the least loaded's by this."""
    log_requests: bool = True
    """Write one JSON log line per request."""
    report_timings: bool = True
    """Add the non-standard "scalellm_timings" field (stage timestamps) to successful responses."""
    tool_call_parser: str | None = None
    """How replies' tool calls are read (scalellm/protocol/tool_parsers); None picks by the model's name."""
    replica_secret: str | None = field(default=None, repr=False)
    """The deployment's secret, sent with every call to a replica (scalellm/rpc/auth.py); None when the
    replicas serve every call. Set by `scalellm serve`, never a flag."""
    otlp_traces_endpoint: str | None = None
    """OTLP endpoint to export OpenTelemetry traces to: http://HOST:4318/v1/traces (OTLP/HTTP, protobuf),
    grpc://HOST:4317 or HOST:4317 (OTLP/gRPC). None: tracing off, unless the standard
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables name one (scalellm/tracing/config.py).
    `scalellm serve` gives the same endpoint to its replicas."""
    ssl_certfile: str | None = None
    """PEM certificate (with its chain) of the HTTP listener; with ssl_keyfile the gateway serves HTTPS only."""
    ssl_keyfile: str | None = None
    """PEM private key of ssl_certfile."""
    guards: tuple[str, ...] = ()
    """Guards for every key's requests: pii, pii:redact, deny:FILE, moderation:URL[,timeout=S][,fail=open|closed]
    or moderation:served[,template=FILE][,timeout=S][,fail=open|closed]; a key file adds guard=SPEC per key."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "replica_addresses", tuple(self.replica_addresses))
        object.__setattr__(self, "api_keys", tuple(self.api_keys))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for address in self.replica_addresses:
            if ":" not in address:
                raise ValueError(f"replica address must be HOST:PORT, got {address!r}")
        if self.rate_limit_rpm is not None and self.rate_limit_rpm <= 0:
            raise ValueError("rate_limit_rpm must be > 0 (or None to disable rate limiting)")
        _positive("max_queue", self.max_queue)
        if self.max_concurrent is not None:
            _positive("max_concurrent", self.max_concurrent)
        _positive("max_body_bytes", self.max_body_bytes)
        _positive("breaker_failure_threshold", self.breaker_failure_threshold)
        _positive("prefix_affinity_chars", self.prefix_affinity_chars)
        _positive("max_connections", self.max_connections)
        for name in ("request_timeout_s", "health_interval_s", "health_timeout_s", "connect_timeout_s",
                     "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            _positive(name, getattr(self, name))
        if self.drain_timeout_s < 0 or self.breaker_cooldown_s < 0 or self.prefix_affinity_load_bound < 0:
            raise ValueError("drain_timeout_s, breaker_cooldown_s and prefix_affinity_load_bound must be >= 0")
        for spec in self.api_keys:
            parse_key_line(spec)
        object.__setattr__(self, "guards", tuple(self.guards))
        if self.otlp_traces_endpoint is not None:
            from scalellm.tracing import tracing_config

            tracing_config(self.otlp_traces_endpoint, "scalellm-gateway")  # ValueError for a bad endpoint
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("HTTPS needs both ssl_certfile and ssl_keyfile (--ssl-certfile and --ssl-keyfile)")
        if self.tool_call_parser is not None:
            from scalellm.protocol.tool_parsers import get_tool_parser

            get_tool_parser(self.tool_call_parser)  # ValueError naming the choices

    @property
    def scheme(self) -> str:
        """"https" when the listener has a certificate, else "http"."""
        return "https" if self.ssl_certfile is not None else "http"

    @property
    def auth_enabled(self) -> bool:
        """True when inference routes need an API key."""
        return bool(self.api_keys or self.api_key_file)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
