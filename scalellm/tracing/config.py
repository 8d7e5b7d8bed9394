"""Where spans go: the OTLP endpoint and protocol, from the flag or the standard OTEL_* variables.

Endpoint forms (`--otlp-traces-endpoint`):
    http://HOST:PORT/v1/traces, https://...   OTLP/HTTP with protobuf bodies, to that exact URL
    grpc://HOST:PORT, HOST:PORT                OTLP/gRPC (plaintext; grpcs:// for TLS)
Without the flag, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT turns tracing on,
with OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL (grpc, http/protobuf; default http/protobuf) choosing the
protocol as the OpenTelemetry specification says. OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none
keep it off. The exporters read the other OTEL_EXPORTER_OTLP_* variables (headers, timeout,
compression, certificates) and the batch processor the OTEL_BSP_* ones themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

HTTP, GRPC = "http/protobuf", "grpc"


@dataclass(frozen=True)
class TracingConfig:
    """One process's tracing: where to export and under which service name."""

    endpoint: str
    """The OTLP endpoint: a URL for OTLP/HTTP, HOST:PORT for OTLP/gRPC."""
    protocol: str
    """http/protobuf or grpc."""
    service_name: str
    """This process's service.name (scalellm-gateway, scalellm-replica)."""
    insecure: bool = True
    """OTLP/gRPC without TLS (grpc:// and bare HOST:PORT); grpcs:// and https:// use TLS."""

    def __post_init__(self) -> None:
        if self.protocol not in (HTTP, GRPC):
            raise ValueError(f"OTLP protocol must be {HTTP} or {GRPC}, got {self.protocol!r}")
        if not self.endpoint:
            raise ValueError("the OTLP traces endpoint is empty")


def tracing_config(endpoint: str | None, service_name: str,
                   environ: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The TracingConfig of the flag's `endpoint` (None: the OTEL_* variables), or None when tracing is off.

    Raises ValueError for an endpoint that is neither a URL nor HOST:PORT.
    """
    env = os.environ if environ is None else environ
    if endpoint is None:
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER", "") == "none":
            return None
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if not endpoint:
            return None
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or HTTP
        if protocol == HTTP and "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in env:
            endpoint = endpoint.rstrip("/") + "/v1/traces"  # the base endpoint gets the signal's path
        return _parse(endpoint, protocol, service_name)
    return _parse(endpoint, None, service_name)


def _parse(endpoint: str, protocol: str | None, service_name: str) -> TracingConfig:
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "", endpoint
    scheme = scheme.lower()
    if scheme in ("http", "https") and protocol != GRPC:
        return TracingConfig(endpoint, HTTP, service_name)
    if scheme in ("grpc", "grpcs", "http", "https", ""):
        host_port = rest.rstrip("/")
        _check_host_port(endpoint, host_port)
        return TracingConfig(host_port, GRPC, service_name, insecure=scheme in ("grpc", "http", ""))
    raise ValueError(f"OTLP traces endpoint {endpoint!r}: use http://HOST:PORT/v1/traces (OTLP/HTTP), "
                     "grpc://HOST:PORT or HOST:PORT (OTLP/gRPC)")


def _check_host_port(endpoint: str, host_port: str) -> None:
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit() or "/" in host_port:
        raise ValueError(f"OTLP traces endpoint {endpoint!r}: an OTLP/gRPC endpoint is HOST:PORT "
                         "(or grpc://HOST:PORT); OTLP/HTTP needs a URL such as http://HOST:4318/v1/traces")
