"""Keep each measured system alone on the machine, and prove it afterwards.

A comparison is only fair when every system gets the same machine. Three things
have spoiled one before: a server of an earlier system still alive, a thread or
affinity setting of the bench's own shell leaking into a peer (vLLM binds its
OpenMP threads to the cores it is allowed), and other work on the machine while
a system runs (vLLM's auto binding puts all its compute on one core, so a
neighbour on that core costs it far more than an unpinned server). Hence:

* ``leftover_servers`` lists the serving processes (scalellm, vLLM, llama.cpp)
  alive right now; compare mode refuses to start a system while there are any.
* ``peer_environment`` starts a system from the bench's environment less the
  thread, affinity and preload settings, and records what it removed.
* ``machine_cpu`` reads /proc/stat, so a run can tell how much CPU went to
  processes that are neither the server nor the bench (``other_cpu_s``) and how
  much the hypervisor took (``steal_s``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
SCALELLM_SUBCOMMANDS = ("serve", "replica", "gateway")
LLAMA_BINARIES = ("llama-server", "llama-perplexity", "llama-cli")


SCRUBBED_PREFIXES = ("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "BLIS_", "NUMEXPR_", "VECLIB_",
                     "VLLM_", "ONEDNN_", "DNNL_", "SCALELLM_PARENT_PID")
SCRUBBED_NAMES = ("LD_PRELOAD", "TORCH_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
RECORDED_PREFIXES = SCRUBBED_PREFIXES + SCRUBBED_NAMES + ("PATH", "PYTHONPATH", "HF_", "TRANSFORMERS_")


@dataclass(frozen=True)
class ServerProcess:
    """A serving process found in /proc."""

    pid: int
    family: str
    cmdline: str
    """The first 200 characters of its command line."""


def read_argv(pid: int, proc: Path = _PROC) -> list[str]:
    """The arguments of ``pid`` ([] if unreadable, e.g. a kernel thread)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def classify(argv: list[str]) -> str | None:
    """The server family ('scalellm', 'vllm', 'llama.cpp') an argument list belongs to, or None.

    scalellm: the ``scalellm`` program or a ``scalellm.*`` module with a serving subcommand
    (``serve``, ``replica``, ``gateway``; ``bench`` is a client). vLLM: a ``vllm.entrypoints``
    module, ``vllm serve``, or a process titled ``VLLM::...`` (its engine core). llama.cpp: a
    program named llama-server, llama-perplexity or llama-cli.
    """
    if not argv:
        return None
    names = [Path(arg).name for arg in argv]
    if names[0].startswith("VLLM::") or any(a.startswith("vllm.entrypoints") for a in argv) or \
            ("vllm" in names and "serve" in argv):
        return "vllm"
    if names[0] in LLAMA_BINARIES:
        return "llama.cpp"
    is_scalellm = any(n == "scalellm" or n.startswith("scalellm.") for n in names[:3])
    if is_scalellm and (any(a in SCALELLM_SUBCOMMANDS for a in argv) or "scalellm.supervisor" in argv):
        return "scalellm"
    return None


def leftover_servers(exclude: set[int] | None = None, proc: Path = _PROC) -> list[ServerProcess]:
    """Every serving process alive now, except ``exclude`` and this process's ancestors."""
    skip = set(exclude or ()) | ancestors(os.getpid(), proc)
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        argv = read_argv(int(entry.name), proc)
        family = classify(argv)
        if family is not None:
            found.append(ServerProcess(int(entry.name), family, " ".join(argv)[:200]))
    return sorted(found, key=lambda p: p.pid)


def ancestors(pid: int, proc: Path = _PROC) -> set[int]:
    """``pid`` and every parent above it."""
    chain = set()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        try:
            fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            break
        pid = int(fields[1])
    return chain


def check_alone(what: str, proc: Path = _PROC) -> None:
    """RuntimeError naming every serving process alive, so a system never shares the machine."""
    servers = leftover_servers(proc=proc)
    if servers:
        listing = "\n".join(f"  pid {s.pid} ({s.family}): {s.cmdline}" for s in servers)
        raise RuntimeError(f"refusing to start {what}: other servers are alive on this machine\n{listing}\n"
                           "stop them (or pass --allow-other-servers to measure anyway, recorded in the results)")


def peer_environment(base: dict[str, str], extra: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """``base`` less thread/affinity/preload settings, plus ``extra``; and the names removed."""
    removed = sorted(k for k in base if k.startswith(SCRUBBED_PREFIXES) or k in SCRUBBED_NAMES)
    env = {k: v for k, v in base.items() if k not in removed}
    env.update(extra)
    return env, [k for k in removed if k not in extra]


def recorded_environment(env: dict[str, str]) -> dict[str, str]:
    """The settings of ``env`` that can change a server's speed (for results.json)."""
    return {k: v for k, v in sorted(env.items()) if k.startswith(RECORDED_PREFIXES)}


def allowed_cpus(pid: int, proc: Path = _PROC) -> str:
    """``Cpus_allowed_list`` of a process ('' if unreadable)."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def widen_affinity() -> None:
    """In a child before exec: allow every online CPU (undoes a ``taskset`` the bench ran under)."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:
        pass  # a cgroup cpuset may forbid some; the recorded affinity shows what the child got


def memory_available_gib(proc: Path = _PROC) -> float | None:
    """``MemAvailable`` of /proc/meminfo in GiB (None if unreadable): a system that starts short of
    memory, or swaps, is not measured on the same machine as the others."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class MachineCpu:
    """Machine-wide CPU seconds since boot, from the first line of /proc/stat."""

    busy_s: float
    steal_s: float


def parse_proc_stat(text: str, ticks_per_s: int) -> MachineCpu:
    """``cpu  user nice system idle iowait irq softirq steal ...`` -> busy and steal seconds.

    Busy is user + nice + system + irq + softirq (guest time is already inside user);
    idle, iowait and steal are not busy.
    """
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ValueError("the first line of /proc/stat is not the 'cpu' total")
    values = [int(v) for v in fields[1:]] + [0] * 8
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return MachineCpu(busy_s=(user + nice + system + irq + softirq) / ticks_per_s, steal_s=steal / ticks_per_s)


def machine_cpu(proc: Path = _PROC) -> MachineCpu | None:
    """The machine's CPU counters now (None where /proc/stat is unreadable)."""
    try:
        return parse_proc_stat((proc / "stat").read_text(), os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return None


def other_cpu_seconds(before: MachineCpu, after: MachineCpu, server_s: float, bench_s: float) -> float:
    """CPU the machine spent in a window on anything but the server and the bench (>= 0)."""
    return max(0.0, (after.busy_s - before.busy_s) - server_s - bench_s)
