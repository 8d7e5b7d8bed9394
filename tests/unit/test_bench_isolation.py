"""Isolation of compare mode: finding leftover servers, the peer's environment, the machine's CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scalellm.bench import isolation
from scalellm.bench.isolation import MachineCpu


@pytest.mark.parametrize("argv, family", [
    (["/w/.venv/bin/python", "-m", "scalellm.cli", "serve", "--port", "1"], "scalellm"),
    (["/w/.venv/bin/scalellm", "serve"], "scalellm"),
    (["python", "-m", "scalellm.cli", "replica", "--engine", "real"], "scalellm"),
    (["/w/.venv/bin/scalellm", "bench", "--compare"], None),
    (["cmake", "--build", "/root/.cache/scalellm/peers/llamacpp/build", "--target", "llama-server"], None),
    (["/usr/bin/gmake", "-f", "Makefile", "llama-server"], None),
    (["/p/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m"], "vllm"),
    (["VLLM::EngineCore"], "vllm"),
    (["/p/llamacpp/build/bin/llama-server", "-m", "x.gguf"], "llama.cpp"),
    (["pytest", "tests/unit/test_bench_isolation.py"], None),
    ([], None),
])
def test_classify_names_serving_processes_only(argv, family):
    assert isolation.classify(argv) == family


def fake_proc(tmp_path: Path, processes: dict[int, tuple[int, list[str]]]) -> Path:
    """A /proc with pid -> (parent, argv) entries."""
    for pid, (parent, argv) in processes.items():
        entry = tmp_path / str(pid)
        entry.mkdir()
        entry.joinpath("cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        entry.joinpath("stat").write_text(f"{pid} (x y) S {parent} 0 0 0 0 0 0 0 0 0 1 2 3 4 0\n")
    return tmp_path


def test_leftover_servers_and_check_alone_on_a_fake_proc(tmp_path):
    proc = fake_proc(tmp_path, {
        10: (1, ["/v/bin/python", "-m", "scalellm.cli", "serve", "--port", "9"]),
        11: (10, ["/v/bin/python", "-m", "scalellm.cli", "replica"]),
        12: (1, ["bash"]),
        13: (1, ["/c/llama-server", "-m", "m.gguf"]),
    })
    found = isolation.leftover_servers(proc=proc)
    assert [(p.pid, p.family) for p in found] == [(10, "scalellm"), (11, "scalellm"), (13, "llama.cpp")]
    assert [p.pid for p in isolation.leftover_servers(exclude={10, 11}, proc=proc)] == [13]
    with pytest.raises(RuntimeError, match=r"pid 13 \(llama.cpp\)"):
        isolation.check_alone("vllm", proc=proc)
    (tmp_path / "quiet").mkdir()
    isolation.check_alone("vllm", proc=fake_proc(tmp_path / "quiet", {12: (1, ["bash"])}))  # no raise


def test_a_real_leftover_server_is_found_and_ours_are_not():
    # A process whose command line reads `scalellm -c ... serve` (exec -a names argv[0]).
    fake = subprocess.Popen(["bash", "-c", f'exec -a scalellm {sys.executable} -c "import time; time.sleep(30)" serve'])
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and isolation.read_argv(fake.pid)[:1] != ["scalellm"]:
            time.sleep(0.02)
        pids = {p.pid for p in isolation.leftover_servers()}
        assert fake.pid in pids
        assert os.getpid() not in pids and os.getppid() not in pids
    finally:
        fake.kill()
        fake.wait()


def test_peer_environment_drops_thread_and_affinity_settings():
    base = {"PATH": "/bin", "OMP_NUM_THREADS": "1", "KMP_AFFINITY": "x", "LD_PRELOAD": "libfoo.so",
            "VLLM_CPU_OMP_THREADS_BIND": "0", "SCALELLM_PARENT_PID": "7", "HOME": "/root"}
    env, removed = isolation.peer_environment(base, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env == {"PATH": "/bin", "HOME": "/root", "VLLM_CPU_KVCACHE_SPACE": "4"}
    assert removed == ["KMP_AFFINITY", "LD_PRELOAD", "OMP_NUM_THREADS", "SCALELLM_PARENT_PID",
                       "VLLM_CPU_OMP_THREADS_BIND"]
    assert isolation.recorded_environment(env) == {"PATH": "/bin", "VLLM_CPU_KVCACHE_SPACE": "4"}
    env, removed = isolation.peer_environment({"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"})
    assert env == {"OMP_NUM_THREADS": "2"} and removed == []  # the system's own setting wins, not "removed"


def test_child_affinity_is_widened_to_every_cpu():
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    script = "import os; print(sorted(os.sched_getaffinity(0)))"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c",
                             "import subprocess, sys; from scalellm.bench import isolation; "
                             f"subprocess.run([sys.executable, '-c', {script!r}], "
                             "preexec_fn=isolation.widen_affinity)"], capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == str(list(range(os.cpu_count())))


def test_proc_stat_parsing_and_other_cpu():
    text = "cpu  100 5 50 1000 20 3 2 40 0 0\ncpu0 1 2 3 4\n"
    cpu = isolation.parse_proc_stat(text, ticks_per_s=100)
    assert cpu == MachineCpu(busy_s=1.6, steal_s=0.4)
    with pytest.raises(ValueError):
        isolation.parse_proc_stat("intr 1 2 3\n", 100)
    before, after = MachineCpu(10.0, 1.0), MachineCpu(16.0, 1.5)
    assert isolation.other_cpu_seconds(before, after, server_s=4.0, bench_s=0.5) == pytest.approx(1.5)
    assert isolation.other_cpu_seconds(before, after, server_s=7.0, bench_s=0.5) == 0.0
    assert isolation.machine_cpu().busy_s > 0


def test_memory_available(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 2097152 kB\n")
    assert isolation.memory_available_gib(tmp_path) == 2.0
    assert isolation.memory_available_gib(tmp_path / "none") is None
    assert isolation.memory_available_gib() > 0


def test_allowed_cpus_reads_the_status_file():
    assert isolation.allowed_cpus(os.getpid())  # e.g. "0-1"
    assert isolation.allowed_cpus(999_999_999) == ""
