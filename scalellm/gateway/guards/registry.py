"""Guards by name: a guard spec (`NAME` or `NAME:ARGUMENT`) to a Guard (the package docstring lists them)."""

from __future__ import annotations

from typing import Callable

from scalellm.gateway.guards.base import Guard
from scalellm.gateway.guards.deny import DenyGuard
from scalellm.gateway.guards.moderation import HttpModerationGuard, ServedModerationGuard
from scalellm.gateway.guards.pii import PiiGuard


def _pii(argument: str | None) -> Guard:
    if argument not in (None, "redact"):
        raise ValueError(f"pii takes no argument or ':redact', got ':{argument}'")
    return PiiGuard(redact_input=argument == "redact")


def _deny(argument: str | None) -> Guard:
    if not argument:
        raise ValueError("deny needs a pattern file: deny:FILE")
    return DenyGuard(argument)


def _moderation(argument: str | None) -> Guard:
    if not argument:
        raise ValueError("moderation needs an endpoint URL or 'served': moderation:URL or moderation:served")
    target, *options = argument.split(",")
    settings = {}
    for option in options:
        name, equals, value = option.partition("=")
        if not equals or name not in ("timeout", "fail", "template", "max_tokens"):
            raise ValueError(f"unknown moderation option {option!r}; options: timeout=S, fail=open|closed, "
                             "template=FILE, max_tokens=N")
        settings[name] = value
    if settings.get("fail", "closed") not in ("open", "closed"):
        raise ValueError(f"fail must be open or closed, got {settings['fail']!r}")
    try:
        common = {"timeout_s": float(settings.get("timeout", 2.0)),
                  "fail_closed": settings.get("fail", "closed") == "closed"}
        if target == "served":
            return ServedModerationGuard(settings.get("template"), int(settings.get("max_tokens", 4)), **common)
    except ValueError as error:
        raise ValueError(f"bad moderation option: {error}") from None
    if "template" in settings or "max_tokens" in settings:
        raise ValueError("template and max_tokens go with moderation:served")
    return HttpModerationGuard(target, **common)


GUARDS: dict[str, Callable[[str | None], Guard]] = {"pii": _pii, "deny": _deny, "moderation": _moderation}


def guard_names() -> list[str]:
    return sorted(GUARDS)


def create_guard(spec: str) -> Guard:
    """The guard a spec names (`NAME` or `NAME:ARGUMENT`); ValueError naming what is wrong."""
    name, colon, argument = spec.strip().partition(":")
    factory = GUARDS.get(name)
    if factory is None:
        raise ValueError(f"unknown guard {spec!r}; guards: {', '.join(guard_names())} (as pii, pii:redact, "
                         "deny:FILE, moderation:URL or moderation:served)")
    return factory(argument if colon else None)

