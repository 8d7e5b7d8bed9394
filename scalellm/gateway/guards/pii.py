"""The `pii` guard: e-mail addresses, phone numbers and payment-card numbers (Luhn-checked).

In a prompt they refuse the request (`pii`) or are replaced by a placeholder before the model sees
them (`pii:redact`); in a reply they are always masked with the same placeholders:

    e-mail  [EMAIL]      phone  [PHONE]      card  [CARD]

Detection is by regular expressions, deliberately conservative for phone numbers (a `+` country
code, or the (NNN) NNN-NNNN / NNN-NNN-NNNN shapes) so dates, versions and ids are not taken for them,
and card numbers (13 to 19 digits, spaces or dashes allowed between them) count only when their
Luhn checksum holds.
"""

from __future__ import annotations

import re

from scalellm.gateway.guards.base import ALLOW, OutputScan, Guard, GuardContext, Span, Verdict

EMAIL = "EMAIL"
PHONE = "PHONE"
CARD = "CARD"
KINDS = {EMAIL: "an e-mail address", PHONE: "a phone number", CARD: "a payment card number"}

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}(?![\w-])")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
                    r"|(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4})(?!\w)")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])")
MAX_MATCH_CHARS = 80
"""Longest reply text a match may take and still be masked whole (e-mail addresses longer than this
are masked only in part)."""


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (payment cards use it)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every e-mail, phone and card number in `text`, non-overlapping, in order."""
    found: list[tuple[int, int, str]] = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if luhn_valid(digits):
            found.append((match.start(), match.end(), CARD))
    for match in _EMAIL.finditer(text):
        found.append((match.start(), match.end(), EMAIL))
    for match in _PHONE.finditer(text):
        if 7 <= sum(c.isdigit() for c in match.group()) <= 15:
            found.append((match.start(), match.end(), PHONE))
    return _without_overlaps(found)


def _without_overlaps(found: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Keep earlier-listed kinds (cards, then e-mails, then phones) where matches overlap."""
    kept: list[tuple[int, int, str]] = []
    for start, end, kind in found:
        if all(end <= s or start >= e for s, e, _ in kept):
            kept.append((start, end, kind))
    return sorted(kept)


def redact(text: str) -> str:
    """`text` with every match replaced by its placeholder."""
    parts, last = [], 0
    for start, end, kind in find_pii(text):
        parts += [text[last:start], f"[{kind}]"]
        last = end
    return "".join(parts) + text[last:]


class PiiGuard(Guard):
    """Refuses (or, with `redact`, rewrites) prompts holding personal data; masks it in replies."""

    name = "pii"
    max_match_chars = MAX_MATCH_CHARS

    def __init__(self, redact_input: bool = False) -> None:
        self.redact_input = redact_input

    async def check_input(self, texts: tuple[str, ...], context: GuardContext) -> Verdict:
        if self.redact_input:
            rewritten = tuple(redact(text) for text in texts)
            return ALLOW if rewritten == texts else Verdict(texts=rewritten)
        for text in texts:
            found = find_pii(text)
            if found:
                kinds = sorted({KINDS[kind] for _, _, kind in found})
                return Verdict(blocked=True, reason=f"the request contains personal data ({', '.join(kinds)})")
        return ALLOW

    def scan_output(self, window: str) -> OutputScan:
        masks = tuple(Span(start, end, f"[{kind}]") for start, end, kind in find_pii(window))
        return OutputScan(masks=masks)
