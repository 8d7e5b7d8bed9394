"""What a replica is given: the engine's config, the engine kind, and where to listen.

`scalellm serve` hands each replica process its whole ReplicaConfig as one line of JSON on its stdin
(scalellm/flags.py `to_json`); `scalellm replica` run by hand builds the same dataclass from flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scalellm.config import EngineConfig

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class MockEngineConfig:
    """The mock engine: the real engine over a fake model (scalellm/engine/fake_model.py), whose steps
    make up tokens on a fixed cadence, to measure and test everything around the model."""

    tpot_ms: float = 5.0
    """Mock engine: milliseconds per engine step, so per output token (steps fall on a fixed cadence)."""
    ttft_ms: float = 0.0
    """Mock engine: extra milliseconds of a step that prefills a request."""

    def __post_init__(self) -> None:
        if self.tpot_ms < 0 or self.ttft_ms < 0:
            raise ValueError(f"tpot_ms and ttft_ms must be >= 0, got {self.tpot_ms} and {self.ttft_ms}")


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica: an engine behind the gRPC service on HOST:PORT."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine; with the mock engine its model is only the name served (default "mock")."""
    mock: MockEngineConfig | None = None
    """Set: serve the mock engine instead of the model."""
    host: str = "127.0.0.1"
    """Interface the gRPC server binds to."""
    port: int = DEFAULT_PORT
    """gRPC port (0 picks a free one)."""
    secret: str | None = field(default=None, repr=False)
    """The deployment's secret: calls without it are refused (scalellm/rpc/auth.py). None serves every
    call; `scalellm serve` sets one when its replicas listen beyond loopback. Never a flag."""
    otlp_traces_endpoint: str | None = None
    """OTLP endpoint to export OpenTelemetry traces to: http://HOST:4318/v1/traces (OTLP/HTTP, protobuf),
    grpc://HOST:4317 or HOST:4317 (OTLP/gRPC). None: tracing off, unless the standard
    OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables name one (scalellm/tracing/config.py)."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.otlp_traces_endpoint is not None:
            from scalellm.tracing import tracing_config

            tracing_config(self.otlp_traces_endpoint, "scalellm-replica")  # ValueError for a bad endpoint

    @property
    def address(self) -> str:
        """HOST:PORT (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
