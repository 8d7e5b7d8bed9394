"""`python -m scalellm.engine.layers.kernels` (make install): every serving kernel built, or reported."""

from __future__ import annotations

import os
import subprocess
import sys

from scalellm.engine.layers.kernels import SERVING_KERNELS


def prebuild(**env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalellm.engine.layers.kernels"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_prebuild_builds_every_serving_kernel():
    done = prebuild()  # the machine's cache: instant after make install
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if line.startswith("kernel ")] == [
        f"kernel {name}: built" for name in SERVING_KERNELS]


def test_prebuild_reports_what_cannot_be_built_and_succeeds(tmp_path):
    done = prebuild(CXX="no-such-compiler", XDG_CACHE_HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    for name in SERVING_KERNELS:
        assert f"kernel {name}: unavailable, the torch path is used: no C++ compiler" in done.stdout
