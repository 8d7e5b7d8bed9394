"""API-key authentication: keys are held only as sha256 digests and compared in constant time.

Inference routes (/v1/...) need `Authorization: Bearer KEY` when keys are configured; /health and
/metrics never do (load balancers and Prometheus scrape them without credentials).
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

ANONYMOUS = "anonymous"


def hash_key(key: str) -> bytes:
    """The sha256 digest a key is stored as."""
    return hashlib.sha256(key.encode()).digest()


def read_key_file(path: str) -> list[str]:
    """Keys from a file, one per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ApiKeyAuth:
    """Checks bearer tokens against a set of key digests."""

    def __init__(self, keys: list[str] | tuple[str, ...] = (), key_file: str | None = None) -> None:
        all_keys = list(keys) + (read_key_file(key_file) if key_file else [])
        if key_file and not all_keys:
            raise ValueError(f"API key file {key_file} holds no keys")
        self._digests = [hash_key(key) for key in all_keys]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._digests)

    def identify(self, authorization: bytes | None) -> str | None:
        """The caller's identity for rate limiting, or None when the key is missing or wrong.

        With no keys configured everyone is `ANONYMOUS`. The identity of a valid key is a short
        prefix of its digest, never the key itself. Every stored digest is compared, so the time
        taken does not reveal which key (if any) matched.
        """
        if not self._digests:
            return ANONYMOUS
        if not authorization or not authorization[:7].lower() == b"bearer ":
            return None
        digest = hashlib.sha256(authorization[7:].strip()).digest()
        matched = None
        for stored in self._digests:
            if hmac.compare_digest(stored, digest):
                matched = stored
        return None if matched is None else matched.hex()[:16]
