"""Command-line flags of the gateway, generated from `GatewayConfig` (used by `scalellm gateway` and `serve`).

Each field of GatewayConfig is a flag whose help is the field's docstring (scalellm/flags.py); the
names below keep the flags short where the field's name carries a unit or reads as a sentence.
"""

from __future__ import annotations

import argparse

from scalellm.flags import add_config_flags, config_from_flags
from scalellm.gateway.auth import ApiKeyAuth
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.guards import GuardPolicy
from scalellm.gateway.policies import policy_names
from scalellm.protocol.tool_parsers import TOOL_PARSERS

FLAG_NAMES = {
    "api_keys": "--api-key",
    "guards": "--guard",
    "header_timeout_s": "--header-timeout",
    "body_timeout_s": "--body-timeout",
    "keep_alive_timeout_s": "--keep-alive-timeout",
    "request_timeout_s": "--request-timeout",
    "drain_timeout_s": "--drain-timeout",
    "health_interval_s": "--health-interval",
    "health_timeout_s": "--health-timeout",
    "connect_timeout_s": "--connect-timeout",
    "breaker_failure_threshold": "--breaker-failures",
    "breaker_cooldown_s": "--breaker-cooldown",
    "log_requests": "--no-request-log",
    "report_timings": "--no-timings",
}
FLAG_ALIASES = {"routing_policy": ("--routing",)}


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    """Add the gateway's flags to `parser` (replica addresses are left to the caller)."""
    group = parser.add_argument_group("gateway")
    add_config_flags(group, GatewayConfig, exclude=("replica_addresses", "replica_secret"), names=FLAG_NAMES,
                     aliases=FLAG_ALIASES,
                     choices={"routing_policy": policy_names(), "tool_call_parser": sorted(TOOL_PARSERS)})


def gateway_config_from_args(args: argparse.Namespace, replica_addresses: list[str] | tuple[str, ...]
                             ) -> GatewayConfig:
    """Build the `GatewayConfig` from parsed flags; raises `ValueError` on invalid values, a key file or
    guard that does not load included (naming the line), so nothing starts with a bad one."""
    config = config_from_flags(GatewayConfig, args, replica_addresses=tuple(replica_addresses))
    check_guards(config)
    return config


def check_guards(config: GatewayConfig) -> None:
    """Read the key file and build every guard once: ValueError naming the flag or key-file line at fault."""
    auth = ApiKeyAuth(config.api_keys, config.api_key_file)
    GuardPolicy(config.guards, auth.key_guards())
