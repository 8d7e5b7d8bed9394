"""API-key authentication with scopes: keys are held only as sha256 digests and compared in constant time.

A key is written `KEY`, `KEY SCOPE[,SCOPE...]`, then optionally per-key settings `NAME=VALUE` (the
same syntax on the command line and in a key file, one key per line); a bare key has the
`inference` scope. Settings (`KeyOptions`):

    guard=SPEC      a guard for this key's requests, besides those of --guard (repeatable; guards/)
    priority=N      the default priority of its requests (lower is more urgent, as vLLM's)
    weight=W        its share of tokens per second when the replicas are saturated (default 1)
    tpm=N           its own limit of generated tokens per minute (429 with Retry-After beyond it)

Scopes and the routes they open:

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
from dataclasses import dataclass
from pathlib import Path

from scalellm.protocol.openai import OpenAIError

ANONYMOUS = "anonymous"
INFERENCE, METRICS, ADMIN = "inference", "metrics", "admin"
SCOPES = (INFERENCE, METRICS, ADMIN)
_IMPLIED = {ADMIN: frozenset({ADMIN, METRICS})}


def hash_key(key: str | bytes) -> bytes:
    """The sha256 digest a key is stored as."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


@dataclass(frozen=True)
class KeyOptions:
    """Per-key settings from a key's `NAME=VALUE` words."""

    guards: tuple[str, ...] = ()
    """Guard specs applied to this key's requests after the --guard ones."""
    priority: int | None = None
    """Default priority of its requests when they send none (lower is more urgent)."""
    weight: float = 1.0
    """Its share of tokens per second against other keys when the replicas are saturated."""
    tokens_per_minute: float | None = None
    """Its own limit of generated tokens per minute; None for no limit."""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if self.tokens_per_minute is not None and not self.tokens_per_minute > 0:
            raise ValueError(f"tpm must be > 0, got {self.tokens_per_minute}")


_OPTION_NAMES = ("guard", "priority", "weight", "tpm")


def parse_key_options(words: list[str]) -> KeyOptions:
    """KeyOptions from `NAME=VALUE` words; ValueError naming the word at fault."""
    values: dict = {"guards": []}
    for word in words:
        name, equals, value = word.partition("=")
        if not equals or name not in _OPTION_NAMES or not value:
            raise ValueError(f"unknown key setting {word!r}; settings: guard=SPEC, priority=N, weight=W, tpm=N")
        try:
            if name == "guard":
                values["guards"].append(value)
            elif name == "priority":
                values["priority"] = int(value)
            elif name == "weight":
                values["weight"] = float(value)
            else:
                values["tokens_per_minute"] = float(value)
        except ValueError:
            raise ValueError(f"key setting {word!r}: {name} must be a number") from None
    return KeyOptions(guards=tuple(values.pop("guards")), **values)


def parse_key_line(spec: str) -> tuple[str, frozenset[str], KeyOptions]:
    """`KEY [SCOPE[,SCOPE...]] [NAME=VALUE ...]` -> (key, scopes, options); errors never show the key."""
    parts = spec.split()
    if len(parts) > 1 and "=" not in parts[1]:
        key, scopes = parse_key_spec(" ".join(parts[:2]))
        words = parts[2:]
    else:
        key, scopes = parse_key_spec(parts[0] if parts else "")
        words = parts[1:]
    return key, scopes, parse_key_options(words)


def parse_key_spec(spec: str) -> tuple[str, frozenset[str]]:
    """`KEY` or `KEY SCOPE[,SCOPE...]` -> (key, scopes); ValueError naming the problem, never the key."""
    parts = spec.split()
    if not parts or len(parts) > 2:
        raise ValueError("an API key is written 'KEY' or 'KEY SCOPE[,SCOPE...]' (no spaces in the key), then "
                         "optional NAME=VALUE settings")
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
    return [spec for _, spec in read_key_file_lines(path)]


def read_key_file_lines(path: str) -> list[tuple[str, str]]:
    """(where, spec) of each key line of a file, where = "API key file PATH line N"."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the API key file {path}: {error.strerror}") from None
    return [(f"API key file {path} line {number}", line.strip()) for number, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]


class ApiKeyAuth:
    """Checks bearer tokens against key digests and the scopes each key holds; keeps each key's options."""

    def __init__(self, keys: list[str] | tuple[str, ...] = (), key_file: str | None = None) -> None:
        specs = [(f"--api-key #{i + 1}", spec) for i, spec in enumerate(keys)]
        specs += read_key_file_lines(key_file) if key_file else []
        if key_file and len(specs) == len(keys):
            raise ValueError(f"API key file {key_file} holds no keys")
        parsed = []
        for where, spec in specs:
            try:
                parsed.append(parse_key_line(spec))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        self._digests = [hash_key(key) for key, _, _ in parsed]
        self._scopes = [scopes for _, scopes, _ in parsed]
        self._options = {digest.hex()[:16]: options for digest, (_, _, options) in zip(self._digests, parsed)}
        self._where = {digest.hex()[:16]: where for digest, (where, _) in zip(self._digests, specs)}

    def options(self, identity: str) -> KeyOptions:
        """The settings of the key with this identity (defaults for ANONYMOUS or an unknown identity)."""
        return self._options.get(identity, _DEFAULT_OPTIONS)

    def key_guards(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """identity -> ((guard spec, where it was written), ...) for every key with guards of its own."""
        return {identity: tuple((spec, self._where[identity]) for spec in options.guards)
                for identity, options in self._options.items() if options.guards}

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


_DEFAULT_OPTIONS = KeyOptions()
