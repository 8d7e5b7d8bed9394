"""What both ends of the gateway <-> replica channel agree on: gRPC options and the deployment secret.

Message size limits match on both sides; keepalive pings every 30 s (answered within 10 s) find a
connection that died silently, and the server accepts pings that often even without calls.

A replica given a secret (a deployment whose replicas listen beyond loopback) serves only calls
that carry it in their metadata; the comparison takes constant time.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
SECRET_METADATA_KEY = "x-scalellm-replica-secret"

_SHARED_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

SERVER_OPTIONS = _SHARED_OPTIONS + (
    ("grpc.so_reuseport", 0),  # a second replica on the same port must fail, not share it
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


def client_options(connect_timeout_s: float) -> tuple[tuple[str, int], ...]:
    """The client channel's options; a connection attempt gives up after `connect_timeout_s`."""
    connect_timeout_ms = max(1, int(connect_timeout_s * 1000))
    return _SHARED_OPTIONS + (
        # gRPC core uses the minimum reconnect backoff as the connection attempt's timeout.
        ("grpc.min_reconnect_backoff_ms", connect_timeout_ms),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),  # a restarted replica is found again within a second
    )


def secret_metadata(secret: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries `secret` (None without one)."""
    return None if secret is None else ((SECRET_METADATA_KEY, secret),)
