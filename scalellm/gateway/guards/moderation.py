"""The moderation hook: a classifier asked about each prompt, with a timeout and fail-open/closed.

Two kinds, written as guard specs:

    moderation:http://host:port/v1/moderations[,timeout=S][,fail=open|closed]
        an external endpoint speaking OpenAI's moderation API: POST {"input": [texts]}, answer
        {"results": [{"flagged": bool, "categories": {name: bool}}]}; any flagged result refuses.
    moderation:served[,template=FILE][,max_tokens=N][,timeout=S][,fail=open|closed]
        the model this server serves, asked through a prompt template (FILE, with {text} where the
        prompt's text goes; a built-in one otherwise) and greedy decoding: a reply starting with
        "unsafe" refuses (the convention of Llama Guard-style classifiers). Nothing is downloaded.

The verdict must come within `timeout` seconds (default 2); a timeout, an unreachable endpoint or an
answer that cannot be read is a GuardError, which refuses the request with fail=closed (the default)
and lets it through with fail=open. Either way the gateway counts it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from scalellm.gateway.guards.base import ALLOW, Guard, GuardContext, GuardError, Verdict

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_TEMPLATE = (
    "You are a content safety classifier. Read the user text below and decide whether it asks for or "
    "contains unsafe content (violence, self-harm, sexual content involving minors, hate, weapons, "
    "malware or other illegal activity).\n\nUser text:\n{text}\n\nAnswer with one word, safe or unsafe.\n"
    "Answer:")


class ModerationGuard(Guard):
    """Common part: the timeout, fail mode and counting of one classifier call per request."""

    name = "moderation"

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, fail_closed: bool = True) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the moderation timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.fail_closed = fail_closed

    async def check_input(self, texts: tuple[str, ...], context: GuardContext) -> Verdict:
        try:
            async with asyncio.timeout(self.timeout_s):
                flagged = await self.classify(texts, context)
        except TimeoutError:
            raise GuardError(f"the moderation check took longer than {self.timeout_s:g} s") from None
        if flagged:
            return Verdict(blocked=True, reason=f"the request was flagged by moderation ({flagged})")
        return ALLOW

    async def classify(self, texts: tuple[str, ...], context: GuardContext) -> str:
        """The flagged categories as text ("" when the texts are fine); GuardError when undecided."""
        raise NotImplementedError


class HttpModerationGuard(ModerationGuard):
    """Asks an external endpoint that speaks OpenAI's moderation API."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S, fail_closed: bool = True) -> None:
        super().__init__(timeout_s, fail_closed)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"a moderation endpoint is an http:// or https:// URL, got {url!r}")
        self.url = url
        self._session: aiohttp.ClientSession | None = None

    async def classify(self, texts: tuple[str, ...], context: GuardContext) -> str:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.post(self.url, json={"input": list(texts)}) as response:
                if response.status != 200:
                    raise GuardError(f"the moderation endpoint answered HTTP {response.status}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, ValueError, OSError) as error:
            raise GuardError(f"the moderation endpoint failed: {error}") from None
        return _flagged(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _flagged(body) -> str:
    """The flagged categories of an OpenAI moderation answer ("flagged" when none are named)."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "flagged" in r for r in results):
        raise GuardError("the moderation endpoint's answer has no results[].flagged")
    names = set()
    for result in results:
        if result["flagged"]:
            categories = result.get("categories") if isinstance(result.get("categories"), dict) else {}
            names |= {name for name, on in categories.items() if on} or {"flagged"}
    return ", ".join(sorted(names))


class ServedModerationGuard(ModerationGuard):
    """Asks the served model through a prompt template; "unsafe" as the reply's first word refuses."""

    def __init__(self, template_path: str | None = None, max_tokens: int = 4,
                 timeout_s: float = DEFAULT_TIMEOUT_S, fail_closed: bool = True) -> None:
        super().__init__(timeout_s, fail_closed)
        self.template = DEFAULT_TEMPLATE if template_path is None else _read_template(template_path)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens

    async def classify(self, texts: tuple[str, ...], context: GuardContext) -> str:
        if context.complete is None:
            raise GuardError("no served model to ask for moderation")
        prompt = self.template.replace("{text}", "\n".join(texts))
        try:
            answer = await context.complete(prompt, self.max_tokens)
        except GuardError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of the call is an undecided verdict
            raise GuardError(f"the moderation model failed: {error}") from None
        words = answer.strip().lower().split()
        return "unsafe" if words and words[0].strip(".,:;!") == "unsafe" else ""


def _read_template(path: str) -> str:
    try:
        template = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the moderation template {path}: {getattr(error, 'strerror', None) or error}"
                         ) from None
    if "{text}" not in template:
        raise ValueError(f"the moderation template {path} has no {{text}} placeholder for the prompt's text")
    return template
