"""`serve --launcher ray` refused before anything starts: ray missing, a cluster that cannot be reached;
and a plain serve that never imports ray. (The cluster itself: tests/reliability/test_ray_launcher.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from scalellm.process import free_ports

SERVE = ["serve", "--launcher", "ray", "--engine", "mock", "--port", "0"]


def _cli(*args: str, hide_ray: bool = False) -> subprocess.CompletedProcess:
    """`scalellm ARGS` in a fresh interpreter, with `import ray` failing when `hide_ray`."""
    code = ("import sys\n" + ("sys.modules['ray'] = None\n" if hide_ray else "")
            + f"sys.argv = ['scalellm', *{list(args)!r}]\nfrom scalellm.cli import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_launcher_ray_without_ray_installed_exits_2_naming_the_extra():
    done = _cli(*SERVE, hide_ray=True)
    assert done.returncode == 2, done.stderr
    assert "needs the ray package" in done.stderr and "pip install 'scalellm[ray]'" in done.stderr


def test_an_unreachable_cluster_exits_2_naming_what_to_do():
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_ports(1)[0]}"
    done = _cli(*SERVE, "--ray-address", address)
    assert done.returncode == 2, done.stderr
    assert f"cannot reach the Ray cluster at {address}" in done.stderr and "ray start --head" in done.stderr


def test_no_cluster_on_this_machine_exits_2_naming_what_to_do(tmp_path):
    pytest.importorskip("ray")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}  # no cluster recorded there
    code = f"import sys\nsys.argv = ['scalellm', *{SERVE!r}]\nfrom scalellm.cli import main\nmain()\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "no Ray cluster runs on this machine: start one with `ray start --head`" in done.stderr


def test_launcher_ray_does_not_go_with_no_gateway():
    done = _cli(*SERVE, "--no-gateway")
    assert done.returncode == 2 and "leave out --launcher ray" in done.stderr


def test_a_plain_serve_path_never_imports_ray():
    code = ("import sys, argparse\nfrom scalellm import cli, serve, supervisor\n"
            "from scalellm.deploy import local, launcher, autopilot\n"
            "parser = argparse.ArgumentParser(); serve.add_serve_args(parser)\n"
            "args = parser.parse_args(['--engine', 'mock'])\n"
            "print(type(serve.deployment_machine(args)).__name__, 'ray' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["Machine", "False"], done.stderr
