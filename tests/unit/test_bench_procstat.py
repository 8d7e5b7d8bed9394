"""Server CPU accounting from /proc."""

import os
import subprocess
import sys
import time

import pytest

from scalellm.bench import procstat

BUSY_CHILD = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def test_busy_child_cpu_is_counted_while_alive_and_after_it_is_reaped():
    code = ("import subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', {BUSY_CHILD.format(seconds=1.0)!r}])\n"
            "child.wait()\ntime.sleep(30)\n")
    parent = subprocess.Popen([sys.executable, "-c", code])
    seen_alive = False
    try:
        time.sleep(0.1)
        before = procstat.tree_cpu_seconds([parent.pid])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.1)
            tree_size = len(procstat.descendants([parent.pid], procstat.process_table()))
            grown = procstat.tree_cpu_seconds([parent.pid]) - before
            seen_alive |= tree_size == 2 and grown > 0.3  # the running child is counted
            if tree_size == 1 and grown > 0.5:  # reaped: its time moved into the parent's cutime
                break
        after = procstat.tree_cpu_seconds([parent.pid])
    finally:
        parent.kill()
        parent.wait()
    assert seen_alive
    assert after - before == pytest.approx(1.0, abs=0.35)


def test_descendants_walks_the_tree():
    table = {1: (0, 5), 10: (1, 1), 11: (10, 2), 12: (10, 3), 20: (1, 7)}
    assert procstat.descendants([10], table) == {10, 11, 12}
    assert procstat.descendants([99], table) == set()


def test_read_stat_handles_odd_command_names(tmp_path):
    (tmp_path / "42").mkdir()
    fields = ["S", "7"] + ["0"] * 9 + ["100", "50", "3", "2"] + ["0"] * 30
    (tmp_path / "42" / "stat").write_text("42 (a (weird) name) " + " ".join(fields))
    assert procstat.read_stat(42, tmp_path) == (7, 155)
    assert procstat.read_stat(43, tmp_path) is None


def test_check_pids():
    assert procstat.check_pids([os.getpid()]) == [os.getpid()]
    with pytest.raises(ValueError, match="no such process"):
        procstat.check_pids([999_999_999])
