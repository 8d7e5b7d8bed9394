"""The systems compare mode can start, and how to start, wait for and stop them.

A system is a ``LaunchSpec``: a command template, environment, readiness path
and client options. Templates may use ``{port}``, ``{gguf}``, ``{scalellm}``
(the scalellm executable next to this interpreter) and ``{python}``.

Built-in systems (``SYSTEMS``):

* ``scalellm``        - ``scalellm serve``: gateway + replica, the full path.
* ``scalellm-direct`` - ``scalellm serve --no-gateway``: the same HTTP API and
  engine in one process, with no gRPC hop, so the gateway's own cost shows.
* ``vllm``            - vLLM's OpenAI server from its own venv (installed on first use).
* ``llamacpp``        - llama.cpp's ``llama-server`` (built on first use); it closes
  keep-alive connections, so the client opens a fresh connection per request.

Any other name given with ``--system-cmd NAME=TEMPLATE`` is a custom system.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scalellm.bench import isolation, peer_install, procstat

SCALELLM_COMMAND = "{scalellm} serve --port {port}"
SCALELLM_DIRECT_COMMAND = "{scalellm} serve --port {port} --replicas 1 --no-gateway"
SYSTEMS = ("scalellm", "scalellm-direct", "vllm", "llamacpp")


@dataclass(frozen=True)
class PeerOptions:
    """Where peers live and what they serve."""

    cache_dir: Path
    gguf: Path
    build_jobs: int = 1
    max_model_len: int | None = None
    """Longest request (prompt + output) each system must take; None keeps each system's default."""


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one system and talk to it."""

    name: str
    command: str
    env: dict = field(default_factory=dict)
    ready_path: str = "/health"
    keepalive: bool = True
    startup_timeout_s: float = 300.0
    details: dict = field(default_factory=dict)
    """Facts about the system recorded with its results (how llama.cpp was built)."""

    def argv(self, port: int, gguf: Path) -> list[str]:
        scalellm = str(Path(sys.executable).with_name("scalellm"))
        text = self.command.format(port=port, gguf=gguf, scalellm=scalellm, python=sys.executable)
        return shlex.split(text)


def parse_system_commands(items: list[str] | None) -> dict[str, str]:
    """``["name=template", ...]`` -> {name: template} (ValueError on a malformed item)."""
    commands = {}
    for item in items or []:
        name, sep, template = item.partition("=")
        if not sep or not name.strip() or not template.strip():
            raise ValueError(f"--system-cmd takes NAME=COMMAND (with {{port}}), got {item!r}")
        if "{port}" not in template:
            raise ValueError(f"--system-cmd {name}: the command must contain {{port}}")
        commands[name.strip()] = template.strip()
    return commands


def prepare_system(name: str, options: PeerOptions, custom: dict[str, str]) -> LaunchSpec:
    """Install the system if needed and return how to start it."""
    if name in custom:
        return LaunchSpec(name, custom[name], keepalive=name != "llamacpp")
    extra = "" if options.max_model_len is None else f" --max-model-len {options.max_model_len}"
    if not _is_default_model(options.gguf):
        extra += " {gguf}"  # the model every system serves
    if name == "scalellm":
        return LaunchSpec(name, SCALELLM_COMMAND + extra, startup_timeout_s=600.0)
    if name == "scalellm-direct":
        return LaunchSpec(name, SCALELLM_DIRECT_COMMAND + extra, startup_timeout_s=600.0)
    if name == "vllm":
        return _prepare_vllm(options)
    if name == "llamacpp":
        return _prepare_llamacpp(options)
    raise ValueError(f"unknown system {name!r}: use one of {', '.join(SYSTEMS)} or define it "
                     f"with --system-cmd {name}='COMMAND --port {{port}}'")


def _is_default_model(gguf: Path) -> bool:
    try:
        return Path(gguf).resolve() == peer_install.default_gguf_path().resolve()
    except ValueError:
        return False


def _prepare_vllm(options: PeerOptions) -> LaunchSpec:
    python = peer_install.install_vllm(options.cache_dir)
    model_dir = peer_install.convert_gguf_for_vllm(options.cache_dir, python, options.gguf)
    command = (f"{shlex.quote(str(python))} -m vllm.entrypoints.openai.api_server "
               f"--model {shlex.quote(str(model_dir))} --served-model-name default "
               f"--dtype bfloat16 --max-model-len {options.max_model_len or 2048} "
               "--host 127.0.0.1 --port {port}")
    return LaunchSpec("vllm", command, env={"VLLM_CPU_KVCACHE_SPACE": "4"}, startup_timeout_s=600.0,
                      details={"weights": "bf16 Hugging Face directory converted from the GGUF",
                               "model_dir": str(model_dir), "python": str(python)})


def _prepare_llamacpp(options: PeerOptions) -> LaunchSpec:
    binary = peer_install.build_llama_server(options.cache_dir, options.build_jobs)
    # 64 slots share 65536 tokens of cache: 1024 each, or any slot up to all of it with -kvu.
    unified = " -kvu" if options.max_model_len and options.max_model_len > 1024 else ""
    command = (f"{shlex.quote(str(binary))} -m {{gguf}} --host 127.0.0.1 --port {{port}} "
               f"-t 2 -np 64 -c 65536{unified} --threads-http 80 --alias default")
    return LaunchSpec("llamacpp", command, keepalive=False, startup_timeout_s=120.0,
                      details={"build": peer_install.llama_build_info(options.cache_dir)})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningSystem:
    """A started system: its process group, base URL and log. Use as a context manager."""

    def __init__(self, spec: LaunchSpec, gguf: Path, log_path: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.argv = spec.argv(self.port, gguf)
        self.env, self.removed_env = isolation.peer_environment(dict(os.environ), spec.env)
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                        preexec_fn=isolation.widen_affinity)

    def describe(self) -> dict:
        """How the system runs: its environment (speed-relevant part), what was removed, its CPUs."""
        return {"env_used": isolation.recorded_environment(self.env), "env_removed": self.removed_env,
                "cpus_allowed": isolation.allowed_cpus(self.process.pid)}

    def __enter__(self) -> "RunningSystem":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Poll the readiness path until it answers 200; RuntimeError if the process dies or times out."""
        deadline = time.monotonic() + self.spec.startup_timeout_s
        url = self.base_url + self.spec.ready_path
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.process.returncode} while starting; "
                                   f"log {self.log_path}:\n{peer_install.tail_of(self.log_path)}")
            if _answers_ok(url):
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.spec.name} was not ready at {url} after {self.spec.startup_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{peer_install.tail_of(self.log_path)}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after ``grace_s``; then end every
        descendant that lives on in a group of its own (scalellm's replicas do)."""
        tree = procstat.descendants([self.process.pid], procstat.process_table()) - {self.process.pid}
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # stragglers left in the group
        _end_processes(tree, grace_s)
        self._log.close()


def _end_processes(pids: set[int], grace_s: float) -> None:
    """SIGTERM the still-alive ``pids``, SIGKILL what is left after ``grace_s``, wait until gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        alive = {pid for pid in pids if procstat.read_stat(pid) is not None}
        for pid in alive:
            _signal_pid(pid, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = {pid for pid in alive if _is_running(pid)}
        if not alive:
            return


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (a zombie's parent has not reaped it yet; it holds no CPU or memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _answers_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
