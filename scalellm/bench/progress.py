"""A live one-line progress report on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from scalellm.bench.client import RequestResult


class ProgressLine:
    """``label  done/total  failed  req/s`` redrawn in place at most every ``interval_s``."""

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None, interval_s: float = 0.25) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.label = label
        self.interval_s = interval_s
        self.num_done = 0
        self.num_failed = 0
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def restart(self, total: int, label: str) -> None:
        """Start counting a new measured window (after warm-up)."""
        self.total, self.label = total, label
        self.num_done = self.num_failed = 0
        self._start = time.perf_counter()

    def update(self, result: RequestResult) -> None:
        self.num_done += 1
        self.num_failed += not result.success
        now = time.perf_counter()
        if self.enabled and (now - self._last_draw >= self.interval_s or self.num_done == self.total):
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        line = (f"{self.label} {self.num_done}/{self.total} done, {self.num_failed} failed, "
                f"{self.num_done / elapsed:.1f} req/s, {elapsed:.0f} s")
        self.stream.write("\r\033[K" + line)
        self.stream.flush()
