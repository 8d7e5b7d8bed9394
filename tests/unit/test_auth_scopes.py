"""API key scopes, key files, constant-time comparison, and keys kept out of reprs and errors."""

from __future__ import annotations

import argparse
import hmac

import pytest

from scalellm.gateway import auth as auth_module
from scalellm.gateway.auth import ADMIN, INFERENCE, METRICS, ApiKeyAuth, parse_key_spec
from scalellm.gateway.cli_args import add_gateway_args, gateway_config_from_args
from scalellm.gateway.config import GatewayConfig
from scalellm.protocol.openai import OpenAIError


def test_key_specs():
    assert parse_key_spec("k1") == ("k1", frozenset({INFERENCE}))
    assert parse_key_spec("k2 metrics") == ("k2", frozenset({METRICS}))
    assert parse_key_spec("  k3   inference,admin ") == ("k3", frozenset({INFERENCE, ADMIN, METRICS}))
    for bad in ("", "k4 root", "k5 metrics extra", "k6 metrics,"):
        with pytest.raises(ValueError) as info:
            parse_key_spec(bad)
        assert "k4" not in str(info.value) and "k5" not in str(info.value) and "k6" not in str(info.value)


def test_scopes_401_and_403():
    auth = ApiKeyAuth(["infer-key", "scrape-key metrics", "ops-key admin"])
    assert auth.authorize(b"Bearer infer-key", INFERENCE)
    assert auth.authorize(b"Bearer scrape-key", METRICS)
    assert auth.authorize(b"Bearer ops-key", METRICS) and auth.authorize(b"Bearer ops-key", ADMIN)
    for header, scope, status in ((b"Bearer scrape-key", INFERENCE, 403), (b"Bearer infer-key", METRICS, 403),
                                  (b"Bearer infer-key", ADMIN, 403), (b"Bearer nope", INFERENCE, 401),
                                  (None, METRICS, 401)):
        with pytest.raises(OpenAIError) as info:
            auth.authorize(header, scope)
        assert info.value.status == status


def test_key_file_with_scopes(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# keys\nplain-key\nscraper-key metrics\n\nops-key admin,inference\n")
    auth = ApiKeyAuth(["flag-key metrics"], key_file=str(path))
    assert auth.identify(b"Bearer plain-key", INFERENCE) and auth.identify(b"Bearer plain-key", METRICS) is None
    assert auth.identify(b"Bearer scraper-key", METRICS) and auth.identify(b"Bearer flag-key", METRICS)
    assert auth.identify(b"Bearer ops-key", INFERENCE) and auth.identify(b"Bearer ops-key", ADMIN)
    (tmp_path / "bad").write_text("secret-value superuser\n")
    with pytest.raises(ValueError, match="unknown API key scope") as info:
        ApiKeyAuth(key_file=str(tmp_path / "bad"))
    assert "secret-value" not in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        ApiKeyAuth(key_file=str(tmp_path / "missing"))


def test_every_stored_digest_is_compared_whichever_matches(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    auth = ApiKeyAuth([f"key-{i}" for i in range(5)])
    for header in (b"Bearer key-0", b"Bearer key-4", b"Bearer wrong"):
        calls.clear()
        auth.identify(header)
        assert len(calls) == 5


def test_keys_from_flags_and_file_reach_the_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_gateway_args(parser)
    (tmp_path / "keys").write_text("f-key\n")
    args = parser.parse_args(["--api-key", "a-key", "--api-key", "m-key metrics",
                              "--api-key-file", str(tmp_path / "keys")])
    config = gateway_config_from_args(args, ["127.0.0.1:1"])
    assert config.api_keys == ("a-key", "m-key metrics") and config.api_key_file == str(tmp_path / "keys")
    assert config.host == "127.0.0.1"
    assert "a-key" not in repr(config) and "m-key" not in repr(config)
    with pytest.raises(ValueError):
        GatewayConfig(api_keys=("k nonsense",))
