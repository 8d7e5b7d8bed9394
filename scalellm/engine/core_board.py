"""Replicas of one machine lend each other their cores, one engine step at a time.

A machine's replicas each get an equal share of its cores (two single-threaded replicas on two
cores). At low load most of them are idle, and their cores with them: one request then decodes at
the speed of one core while the other waits. The board is a small shared file with one byte per
replica, 1 while that replica has work. Before each step a replica marks itself busy and reads the
others' bytes: when every other replica is idle it steps with `threads_alone` intra-op threads (the
whole machine), otherwise with its own share. The engine borrows for small steps, and for steps
of prefills alone, which run layer by layer and re-read the board after every layer (see
engine_core.LEND_MAX_TOKENS): extra threads never outlive a wake-up by more than one small step or
one layer. A replica marks itself busy before it reads, so of two replicas waking together at most
one can see the other idle.

This is the dynamic-routing blueprint (fewer, wider replicas at low load) at the granularity of a
step, without moving requests or starting processes.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path


def create_board(path: str | Path, num_slots: int) -> None:
    """Create (or reset) a board of `num_slots` idle replicas at `path`."""
    if num_slots < 1:
        raise ValueError("a core board needs at least one slot")
    Path(path).write_bytes(bytes(num_slots))


class CoreBoard:
    """One replica's view of the board: its slot, its own thread share and the machine's threads."""

    def __init__(self, path: str | Path, slot: int, threads: int, threads_alone: int) -> None:
        if threads < 1 or threads_alone < threads:
            raise ValueError(f"need 1 <= threads ({threads}) <= threads_alone ({threads_alone})")
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        if not 0 <= slot < len(self._map):
            self._map.close()
            raise ValueError(f"slot {slot} is not on the board of {len(self._map)} replicas")
        self.slot = slot
        self.threads = threads
        self.threads_alone = threads_alone
        self._busy = False
        self.mark_idle()

    def step_threads(self, may_borrow: bool = True) -> int:
        """Mark this replica busy; the intra-op threads its next step should use (its own share
        unless `may_borrow` and every other replica is idle)."""
        if not self._busy:
            self._map[self.slot] = 1
            self._busy = True
        if not may_borrow or self._map[:].count(1) > 1:
            return self.threads
        return self.threads_alone

    def mark_idle(self) -> None:
        """This replica has no work (it waits for requests)."""
        self._map[self.slot] = 0
        self._busy = False

    def close(self) -> None:
        self.mark_idle()
        self._map.close()
