"""API-key authentication with scopes: keys are held only as sha256 digests and compared in constant time.

A key is written `KEY` or `KEY SCOPE[,SCOPE...]` (the same syntax on the command line and in a key
file, one key per line); a bare key has the `inference` scope. Scopes and the routes they open:

    inference   /v1/chat/completions, /v1/completions, /v1/models
    metrics     /metrics
    admin       administrative routes (they may also read /metrics)

With no key configured every route is open. /health and /openapi.json are always open (load
balancers probe them without credentials). A missing or wrong key is a 401; a valid key without the
route's scope is a 403. Keys never leave this module in clear: identities are digest prefixes, and
`describe_key` is what may be logged.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from scalellm.protocol.openai import OpenAIError

ANONYMOUS = "anonymous"
INFERENCE, METRICS, ADMIN = "inference", "metrics", "admin"
SCOPES = (INFERENCE, METRICS, ADMIN)
_IMPLIED = {ADMIN: frozenset({ADMIN, METRICS})}


def hash_key(key: str | bytes) -> bytes:
    """The sha256 digest a key is stored as."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


def parse_key_spec(spec: str) -> tuple[str, frozenset[str]]:
    """`KEY` or `KEY SCOPE[,SCOPE...]` -> (key, scopes); ValueError naming the problem, never the key."""
    parts = spec.split()
    if not parts or len(parts) > 2:
        raise ValueError("an API key is written 'KEY' or 'KEY SCOPE[,SCOPE...]' (no spaces in the key)")
    names = parts[1].split(",") if len(parts) == 2 else [INFERENCE]
    unknown = sorted({name for name in names if name not in SCOPES})
    if unknown:
        raise ValueError(f"unknown API key scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)} "
                         f"(key {describe_key(parts[0])})")
    scopes = frozenset()
    for name in names:
        scopes |= _IMPLIED.get(name, frozenset({name}))
    return parts[0], scopes


def describe_key(key: str) -> str:
    """A loggable name for a key: a prefix of its digest, never the key itself."""
    return "sha256:" + hash_key(key).hex()[:12]


def read_key_file(path: str) -> list[str]:
    """Key specs from a file, one per line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the API key file {path}: {error.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ApiKeyAuth:
    """Checks bearer tokens against key digests and the scopes each key holds."""

    def __init__(self, keys: list[str] | tuple[str, ...] = (), key_file: str | None = None) -> None:
        specs = list(keys) + (read_key_file(key_file) if key_file else [])
        if key_file and not specs:
            raise ValueError(f"API key file {key_file} holds no keys")
        parsed = [parse_key_spec(spec) for spec in specs]
        self._digests = [hash_key(key) for key, _ in parsed]
        self._scopes = [scopes for _, scopes in parsed]

    @property
    def enabled(self) -> bool:
        """True when at least one key is configured."""
        return bool(self._digests)

    def _match(self, authorization: bytes | None) -> int | None:
        """Index of the matching key. Every digest is compared, so timing does not tell which matched."""
        if not authorization or authorization[:7].lower() != b"bearer ":
            return None
        digest = hash_key(authorization[7:].strip())
        matched = None
        for index, stored in enumerate(self._digests):
            if hmac.compare_digest(stored, digest):
                matched = index
        return matched

    def identify(self, authorization: bytes | None, scope: str = INFERENCE) -> str | None:
        """The caller's identity for rate limiting, or None when the key is missing, wrong or lacks `scope`.

        With no keys configured everyone is `ANONYMOUS`. The identity of a valid key is a short
        prefix of its digest, never the key itself.
        """
        try:
            return self.authorize(authorization, scope)
        except OpenAIError:
            return None

    def authorize(self, authorization: bytes | None, scope: str) -> str:
        """The caller's identity; raises OpenAIError 401 (missing or wrong key) or 403 (scope not granted)."""
        if not self._digests:
            return ANONYMOUS
        index = self._match(authorization)
        if index is None:
            raise OpenAIError(401, "missing or invalid API key; send 'Authorization: Bearer <key>'",
                              type="invalid_request_error", code="invalid_api_key")
        if scope not in self._scopes[index]:
            raise OpenAIError(403, f"this API key does not have the '{scope}' scope needed for this route",
                              type="permission_error", code="insufficient_scope")
        return self._digests[index].hex()[:16]
