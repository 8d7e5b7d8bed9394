"""Flags generated from config dataclasses, and their JSON (scalellm/flags.py)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from scalellm.config import EngineConfig
from scalellm.flags import (add_config_flags, config_from_flags, field_docs, from_json, to_flags,
                            to_json)
from scalellm.gateway.cli_args import add_gateway_args, gateway_config_from_args
from scalellm.gateway.config import GatewayConfig


@dataclass(frozen=True)
class Inner:
    """A nested config."""

    rate: float = 1.5
    """Things per second."""


@dataclass(frozen=True)
class Example:
    """Every kind of field a flag is made for."""

    name: str | None = None
    """What it is called."""
    num_items: int = 3
    """How many (100% of them)."""
    verbose: bool = False
    """Say more."""
    cache: bool = True
    """Keep things."""
    tags: tuple[str, ...] = ()
    """Labels."""
    inner: Inner = field(default_factory=Inner)
    """Nested."""

    def __post_init__(self) -> None:
        if self.num_items < 0:
            raise ValueError("num_items must be >= 0")


def parser_for(**kwargs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Example, exclude=("inner",), **kwargs)
    return parser


def test_field_docs_are_the_docstrings_under_the_fields():
    assert field_docs(Example)["num_items"] == "How many (100% of them)."
    assert field_docs(EngineConfig)["block_size"] == "Tokens per KV block."


def test_each_kind_of_field_gets_its_flag_and_comes_back():
    parser = parser_for(positional=("name",), aliases={"num_items": ("-n",)})
    assert config_from_flags(Example, parser.parse_args([])) == Example()
    args = parser.parse_args(["x", "-n", "5", "--verbose", "--no-cache", "--tags", "a", "--tags", "b"])
    config = config_from_flags(Example, args)
    assert config == Example("x", 5, True, False, ("a", "b"))
    assert to_flags(config, exclude=("inner",), positional=("name",)) == [
        "x", "--num-items", "5", "--verbose", "--no-cache", "--tags", "a", "--tags", "b"]
    assert config_from_flags(Example, parser.parse_args(to_flags(config, exclude=("inner",),
                                                                 positional=("name",)))) == config
    assert "100%" in parser.format_help() and "(default 3)" in parser.format_help()


def test_bad_values_are_the_dataclass_s_own_errors():
    with pytest.raises(ValueError, match="num_items"):
        config_from_flags(Example, parser_for().parse_args(["--num-items", "-1"]))
    with pytest.raises(SystemExit):
        parser_for(choices={"name": ("a", "b")}).parse_args(["--name", "c"])


def test_json_round_trip_with_nested_configs_and_tuples():
    config = Example("x", tags=("a",), inner=Inner(2.0))
    assert from_json(Example, to_json(config)) == config
    with pytest.raises(ValueError, match="no field"):
        from_json(Example, '{"nmae": "x"}')
    with pytest.raises(ValueError, match="JSON"):
        from_json(Example, "{")


def test_gateway_flags_keep_their_names_and_cover_every_field():
    parser = argparse.ArgumentParser()
    add_gateway_args(parser)
    args = parser.parse_args(["--health-interval", "0.5", "--breaker-failures", "2", "--no-request-log",
                              "--api-key", "k1", "--api-key", "k2 metrics", "--routing", "round_robin",
                              "--prefix-affinity-chars", "64"])
    config = gateway_config_from_args(args, ["127.0.0.1:1"])
    assert config.health_interval_s == 0.5 and config.breaker_failure_threshold == 2
    assert not config.log_requests and config.api_keys == ("k1", "k2 metrics")
    assert config.routing_policy == "round_robin" and config.prefix_affinity_chars == 64
    assert gateway_config_from_args(parser.parse_args([]), ()) == GatewayConfig()
