"""The guard contract: check a request's text before routing, scan a reply's text as it streams.

A guard sees plain text only. On the way in it answers with a `Verdict` for the prompt's texts
(allow, refuse with a reason, or rewrite them: redaction); on the way out it is given a window of
not-yet-released reply text and answers with the spans to mask and, at most, one match that must
end the reply (`finish_reason: "content_filter"`). The window logic that makes a match spanning
several chunks visible lives in `stream.py`, once for every guard:

    released ──────────────┬───────── window (held back) ─────────┐
    text the client has    │ scanned again with every new chunk;  │ ← new chunk
                           │ the last `holdback_chars` stay here  │

A guard's `max_match_chars` tells the stream how much text it must hold back so a match is never
cut in two by a release; matches longer than that may be seen only in part.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Awaitable, Callable


class GuardError(Exception):
    """A guard could not decide (an endpoint timed out or failed); handled by its fail-open/closed setting."""


@dataclass(frozen=True)
class Verdict:
    """A guard's answer about a request's texts."""

    blocked: bool = False
    reason: str = ""
    """Why the request is refused, for the client's 400 (never the matched text itself)."""
    texts: tuple[str, ...] | None = None
    """Rewritten texts (same count and order as given), or None to keep them."""


ALLOW = Verdict()


@dataclass(frozen=True)
class Span:
    """A match in a scanned window: [start, end) and the text it becomes when masked."""

    start: int
    end: int
    replacement: str = ""


@dataclass(frozen=True)
class OutputScan:
    """What a guard found in a window of reply text."""

    masks: tuple[Span, ...] = ()
    """Spans to replace before release (non-overlapping, in order)."""
    block_at: int | None = None
    """Offset of a match that ends the reply: text before it is released, the rest never is."""
    reason: str = ""


CLEAN = OutputScan()


@dataclass
class GuardContext:
    """Who is asking, for guards whose behaviour or counters depend on the key."""

    key_id: str
    """The caller's short stable id (auth.py's identity), never the key."""
    complete: Callable[[str, int], Awaitable[str]] | None = None
    """Greedy completion of a text prompt (at most N tokens) by the served model, for guards that ask it."""


class Guard(abc.ABC):
    """One guardrail. Implementations are stateless across requests and safe to share."""

    name: str = "guard"
    """The label of its counters (pii, deny, moderation)."""
    fail_closed: bool = True
    """When the guard errors or times out: True refuses the request, False lets it through."""
    max_match_chars: int = 0
    """Longest output match it looks for; 0 when it does not scan outputs."""

    async def check_input(self, texts: tuple[str, ...], context: GuardContext) -> Verdict:
        """The verdict on a request's texts (prompt, chat message contents). May raise GuardError."""
        return ALLOW

    def scan_output(self, window: str) -> OutputScan:
        """Masks and a blocking match in `window`, a stretch of reply text not yet released."""
        return CLEAN

    @property
    def scans_output(self) -> bool:
        return self.max_match_chars > 0
