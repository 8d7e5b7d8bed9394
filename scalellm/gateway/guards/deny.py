"""The `deny:FILE` guard: regular expressions that refuse a prompt and end a reply.

The file holds one Python regular expression per line (blank lines and lines starting with # are
skipped); patterns are matched case-insensitively. A prompt matching any of them is refused; a reply
is cut before the first match and ends with `finish_reason: "content_filter"`. A line that does not
compile stops the server at start, naming the file and the line.
"""

from __future__ import annotations

import re
from pathlib import Path

from scalellm.gateway.guards.base import ALLOW, CLEAN, Guard, GuardContext, OutputScan, Verdict

MAX_MATCH_CHARS = 128
"""Reply text held back for these patterns: a match longer than this may be cut only after part of
it was sent."""


def read_patterns(path: str) -> list[tuple[int, re.Pattern]]:
    """(line number, compiled pattern) of each pattern line; ValueError naming the file and line."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the deny pattern file {path}: {getattr(error, 'strerror', None) or error}"
                         ) from None
    patterns = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            patterns.append((number, re.compile(text, re.IGNORECASE)))
        except re.error as error:
            raise ValueError(f"{path} line {number}: invalid regular expression ({error})") from None
    if not patterns:
        raise ValueError(f"{path}: the deny pattern file holds no patterns")
    return patterns


class DenyGuard(Guard):
    """Refuses prompts and ends replies that match one of the file's patterns."""

    name = "deny"
    max_match_chars = MAX_MATCH_CHARS

    def __init__(self, path: str) -> None:
        self.path = path
        self.patterns = read_patterns(path)

    async def check_input(self, texts: tuple[str, ...], context: GuardContext) -> Verdict:
        for text in texts:
            for number, pattern in self.patterns:
                if pattern.search(text):
                    return Verdict(blocked=True, reason=f"the request matches a denied pattern (rule {number})")
        return ALLOW

    def scan_output(self, window: str) -> OutputScan:
        first = None
        for number, pattern in self.patterns:
            match = pattern.search(window)
            if match and (first is None or match.start() < first[0]):
                first = (match.start(), number)
        if first is None:
            return CLEAN
        return OutputScan(block_at=first[0], reason=f"denied pattern (rule {first[1]})")
