"""Command-line flags of the gateway, mapped onto `GatewayConfig` (used by `scalellm gateway` and `serve`)."""

from __future__ import annotations

import argparse

from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.policies import policy_names
from scalellm.protocol.tool_parsers import TOOL_PARSERS


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    """Add the gateway's flags to `parser` (replica addresses are left to the caller)."""
    defaults = GatewayConfig()
    group = parser.add_argument_group("gateway")
    group.add_argument("--host", default=defaults.host,
                       help="interface to bind (default %(default)s: this machine only; "
                            "give 0.0.0.0 or an address to accept other machines)")
    group.add_argument("--port", type=int, default=defaults.port, metavar="PORT",
                       help="HTTP port (default %(default)s)")
    group.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="model name clients must send; default: the replicas' own")
    group.add_argument("--api-key", action="append", default=[], dest="api_keys", metavar="KEY",
                       help="accepted API key, 'KEY' or 'KEY SCOPE,...' with scopes inference (the "
                            "default), metrics, admin (repeatable; --api-key-file keeps keys out of ps)")
    group.add_argument("--api-key-file", default=None, metavar="PATH",
                       help="file with one key per line, in --api-key's syntax")
    policies = policy_names()
    group.add_argument("--routing-policy", "--routing", default=defaults.routing_policy, choices=policies,
                       metavar="POLICY",
                       help=f"how requests are spread over replicas: {', '.join(policies)} (default %(default)s)")
    group.add_argument("--rate-limit-rpm", type=float, default=None, metavar="RPM",
                       help="requests per minute per API key")
    group.add_argument("--max-queue", type=int, default=defaults.max_queue, metavar="N",
                       help="most requests in flight; beyond it a fast 429 (default %(default)s)")
    group.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes, metavar="N",
                       help="largest request body (default %(default)s)")
    group.add_argument("--max-connections", type=int, default=defaults.max_connections, metavar="N",
                       help="most open client connections; beyond it a 503 (default %(default)s)")
    group.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                       dest="header_timeout_s", metavar="S",
                       help="seconds for a request's headers to arrive (default %(default)s)")
    group.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                       dest="body_timeout_s", metavar="S",
                       help="seconds for a request's body to arrive (default %(default)s)")
    group.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout_s,
                       dest="keep_alive_timeout_s", metavar="S",
                       help="seconds an idle connection stays open (default %(default)s)")
    group.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                       dest="request_timeout_s", metavar="S",
                       help="seconds per request (default %(default)s)")
    group.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout_s,
                       dest="drain_timeout_s", metavar="S",
                       help="seconds to drain on SIGTERM (default %(default)s)")
    group.add_argument("--health-interval", type=float, default=defaults.health_interval_s,
                       dest="health_interval_s", metavar="S",
                       help="seconds between replica probes (default %(default)s)")
    group.add_argument("--health-timeout", type=float, default=defaults.health_timeout_s,
                       dest="health_timeout_s", metavar="S",
                       help="deadline of one replica probe (default %(default)s)")
    group.add_argument("--breaker-failures", type=int, default=defaults.breaker_failure_threshold,
                       dest="breaker_failure_threshold", metavar="N",
                       help="consecutive failures that take a replica out (default %(default)s)")
    group.add_argument("--breaker-cooldown", type=float, default=defaults.breaker_cooldown_s,
                       dest="breaker_cooldown_s", metavar="S",
                       help="seconds before a failed replica is tried again (default %(default)s)")
    group.add_argument("--no-request-log", action="store_false", dest="log_requests",
                       help="do not write one JSON line per request")
    group.add_argument("--no-timings", action="store_false", dest="report_timings",
                       help="leave the non-standard scalellm_timings field out of responses")
    group.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                       help="how replies' tool calls are read (default: by the model's name; hermes for Qwen2.5)")


def gateway_config_from_args(args: argparse.Namespace, replica_addresses: list[str] | tuple[str, ...]
                             ) -> GatewayConfig:
    """Build the `GatewayConfig` from parsed flags; raises `ValueError` on invalid values."""
    return GatewayConfig(
        replica_addresses=tuple(replica_addresses),
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_keys=tuple(args.api_keys or ()),
        api_key_file=args.api_key_file,
        routing_policy=args.routing_policy,
        rate_limit_rpm=args.rate_limit_rpm,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout_s,
        body_timeout_s=args.body_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s,
        request_timeout_s=args.request_timeout_s,
        drain_timeout_s=args.drain_timeout_s,
        health_interval_s=args.health_interval_s,
        health_timeout_s=args.health_timeout_s,
        breaker_failure_threshold=args.breaker_failure_threshold,
        breaker_cooldown_s=args.breaker_cooldown_s,
        log_requests=args.log_requests,
        report_timings=args.report_timings,
        tool_call_parser=getattr(args, "tool_call_parser", None),
    )
