"""Where `scalellm serve` listens, what each API key may reach, that keys stay out of logs, and what
model loading may execute."""

from __future__ import annotations

import argparse
import http.client
import logging
import re
from pathlib import Path

import orjson
import psutil
import pytest
from gateway_fakes import FAKE_MODEL, FakeReplica, GatewayThread
from procs import MOCK, Serve

import scalellm
from scalellm.gateway.cli_args import add_gateway_args, gateway_config_from_args
from scalellm.gateway.config import GatewayConfig
from scalellm.replica.launch import add_replica_args


def listening_addresses(process: psutil.Process) -> set[str]:
    """The addresses it listens on, v4-mapped IPv6 (gRPC's sockets) written as IPv4."""
    return {conn.laddr.ip.removeprefix("::ffff:") for conn in process.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN}


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_listens_on_loopback_only_by_default():
    serve = Serve(*MOCK, "--tpot-ms", "1", "--replicas", "2")
    try:
        children = [*serve.children("gateway").values(), *serve.children("replica").values()]
        assert len(children) == 3
        for child in children:
            assert listening_addresses(child) == {"127.0.0.1"}, child.cmdline()
    finally:
        serve.stop()


def test_binding_elsewhere_is_an_explicit_flag():
    parser = argparse.ArgumentParser()
    add_gateway_args(parser)
    assert gateway_config_from_args(parser.parse_args([]), ()).host == "127.0.0.1"
    assert gateway_config_from_args(parser.parse_args(["--host", "0.0.0.0"]), ()).host == "0.0.0.0"
    replica = argparse.ArgumentParser()
    add_replica_args(replica)
    assert replica.parse_args([]).host == "127.0.0.1"


UNSAFE_LOADING = re.compile(r"torch\.load\(|\bimport (c?pickle|dill|joblib)\b|from (c?pickle|dill|joblib) import"
                            r"|pickle\.loads?\(|trust_remote_code\s*=\s*True|weights_only\s*=\s*False"
                            r"|(?<![.\w])(exec|eval)\(")


def test_no_code_path_can_unpickle_or_run_remote_code():
    """The package never calls an unpickler or enables remote code (behaviour tests: test_loader_fuzz.py)."""
    offenders = []
    for path in Path(scalellm.__file__).parent.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if UNSAFE_LOADING.search(code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


CHAT = orjson.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


def _request(port, method, path, key=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {key}"} if key else {})
    response = conn.getresponse()
    return response.status, response.read()


def test_routes_enforce_scopes_and_keys_never_reach_logs_or_bodies(caplog, tmp_path):
    secrets = ["sk-inference-7f3a", "sk-metrics-91bc", "sk-wrong-0d2e"]
    key_file = tmp_path / "keys"
    key_file.write_text(f"{secrets[1]} metrics\n")
    config = GatewayConfig(replica_addresses=("a:1",), port=0, api_keys=(secrets[0],), api_key_file=str(key_file))
    caplog.set_level(logging.DEBUG)
    bodies = []
    with GatewayThread(config, [FakeReplica("a:1")]) as gw:
        port = gw.app.port
        for key, method, path, body, status in (
                (secrets[0], "POST", "/v1/chat/completions", CHAT, 200),
                (secrets[1], "POST", "/v1/chat/completions", CHAT, 403),
                (secrets[2], "POST", "/v1/chat/completions", CHAT, 401), (None, "POST", "/v1/completions", CHAT, 401),
                (secrets[0], "GET", "/v1/models", None, 200), (secrets[1], "GET", "/v1/models", None, 403),
                (secrets[1], "GET", "/metrics", None, 200), (secrets[0], "GET", "/metrics", None, 403),
                (None, "GET", "/metrics", None, 401), (secrets[2], "GET", "/metrics", None, 401),
                (None, "GET", "/health", None, 200), (None, "GET", "/openapi.json", None, 200)):
            got, raw = _request(port, method, path, key, body)
            assert got == status, (key, path, raw)
            bodies.append(raw.decode())
            if status in (401, 403):
                assert orjson.loads(raw)["error"]["code"] in ("invalid_api_key", "insufficient_scope")
    logged = "\n".join(record.getMessage() for record in caplog.records) + repr(config)
    assert "chat/completions" in logged  # the access log ran
    for secret in secrets:
        assert secret not in logged and all(secret not in body for body in bodies)
