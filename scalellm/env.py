"""The one place that reads environment variables; everything else gets typed values from here.

Variables (all optional):
  SCALELLM_PARENT_PID  set by the supervisor on its children: the pid they must not outlive.
"""

from __future__ import annotations

import os

PARENT_PID_VAR = "SCALELLM_PARENT_PID"


def parent_pid() -> int | None:
    """The supervisor's pid when this process is one of its children, else None."""
    value = os.environ.get(PARENT_PID_VAR, "")
    return int(value) if value.isdigit() else None
