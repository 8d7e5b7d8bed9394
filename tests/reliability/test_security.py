"""Where `scalellm serve` listens, and what model loading may execute."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import psutil
import pytest
from procs import MOCK, Serve

import scalellm
from scalellm.gateway.cli_args import add_gateway_args, gateway_config_from_args
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
