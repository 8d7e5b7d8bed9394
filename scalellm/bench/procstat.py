"""CPU time of a server's processes, read from /proc.

A server is a set of root PIDs plus all their descendants (the gateway, the
replicas, an engine core, worker threads are included since /proc/PID/stat
counts every thread). Per process we add utime + stime + cutime + cstime:
the last two hold the CPU of children that exited and were reaped, so a
worker that ends during the measured window is not lost, and a live child is
never counted twice (its time reaches cutime only once it is reaped and gone
from /proc). Measure a window as ``cpu_seconds(after) - cpu_seconds(before)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

_PROC = Path("/proc")


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def read_stat(pid: int, proc: Path = _PROC) -> tuple[int, int] | None:
    """(parent pid, CPU ticks utime+stime+cutime+cstime) of ``pid``, None if it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime..cstime are fields 14..17.
    parent = int(fields[1])
    ticks = sum(int(value) for value in fields[11:15])
    return parent, ticks


def process_table(proc: Path = _PROC) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, CPU ticks) for every process visible now."""
    table = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name), proc)
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def descendants(roots: Iterable[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """``roots`` and every process below them in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in table]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(roots: Iterable[int], proc: Path = _PROC) -> float:
    """CPU-seconds spent so far by ``roots`` and all their descendants."""
    table = process_table(proc)
    tree = descendants(list(roots), table)
    return sum(table[pid][1] for pid in tree) / clock_ticks_per_second()


def check_pids(pids: Iterable[int], proc: Path = _PROC) -> list[int]:
    """The given PIDs, validated to exist (ValueError naming the missing ones)."""
    pids = list(pids)
    missing = [pid for pid in pids if read_stat(pid, proc) is None]
    if missing:
        raise ValueError(f"--server-pids: no such process {missing}; pass the PIDs of running servers")
    return pids
