"""Compiling StructuredOutputs into xgrammar grammars: once per distinct spec, off the engine thread.

A compile runs in a small thread pool (xgrammar releases the GIL while it builds the token masks'
tables), so neither the asyncio thread nor the engine loop waits on it. A compile that misses its
deadline is refused (the request gets a 400) and its result is still cached when it finishes, so
a retry of the same schema is instant. Concurrent requests with the same spec share one compile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from scalellm.protocol.types import StructuredOutput

DEFAULT_CACHE_SIZE = 256
"""Compiled grammars kept (least recently used go first)."""
DEFAULT_DEADLINE_S = 10.0
"""A grammar that takes longer to compile is refused."""


class GrammarCompileError(ValueError):
    """The spec is not a valid schema, regex or grammar, uses an unsupported feature, or compiled too slowly."""


class GrammarCache:
    """Compiles StructuredOutputs for one tokenizer; a bounded LRU keyed by a hash of kind and spec."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...],
                 max_entries: int = DEFAULT_CACHE_SIZE, deadline_s: float = DEFAULT_DEADLINE_S,
                 num_threads: int = 2) -> None:
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=list(stop_token_ids) or None)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=num_threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="grammar-compile")
        self._entries: OrderedDict[str, object] = OrderedDict()
        self._pending: dict[str, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.deadline_s = deadline_s
        self.last_compile_s = 0.0
        """Seconds the most recent actual compile took (0 for cache hits)."""

    async def compile(self, structured: StructuredOutput):
        """The xgrammar CompiledGrammar for `structured`; raises GrammarCompileError (a ValueError)."""
        future = self._future(structured)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.deadline_s)
        except TimeoutError:
            raise self._too_slow(structured) from None

    def compile_blocking(self, structured: StructuredOutput):
        """`compile` for synchronous callers (the offline engine)."""
        try:
            return self._future(structured).result(timeout=self.deadline_s)
        except concurrent.futures.TimeoutError:
            raise self._too_slow(structured) from None

    def _future(self, structured: StructuredOutput) -> concurrent.futures.Future:
        """A done future for a cached grammar, else the (possibly shared) compile in flight."""
        key = _key(structured)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                done = concurrent.futures.Future()
                done.set_result(self._entries[key])
                return done
            future = self._pending.get(key)
            if future is not None:
                return future
            future = self._pool.submit(self._compile_now, structured)
            self._pending[key] = future
        # Outside the lock: a compile that has already finished runs the callback here, at once, and
        # _store takes the lock (under it, that was a deadlock whenever the compile won the race).
        future.add_done_callback(lambda finished: self._store(key, finished))
        return future

    def _store(self, key: str, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            self._entries[key] = future.result()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def _too_slow(self, structured: StructuredOutput) -> GrammarCompileError:
        return GrammarCompileError(f"the {structured.kind} did not compile within {self.deadline_s:g} s; "
                                   "simplify it")

    def _compile_now(self, structured: StructuredOutput):
        start = time.perf_counter()
        try:
            compiled = _COMPILERS[structured.kind](self._compiler, structured.spec)
        except GrammarCompileError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError, ValueError and its own types
            raise GrammarCompileError(f"invalid {structured.kind}: {_first_line(exc)}") from None
        self.last_compile_s = time.perf_counter() - start
        return compiled

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class LazyGrammarCache:
    """A GrammarCache built on the first structured request: building the tokenizer's tables takes
    about a second, which engines serving no structured request never pay."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        self._args = (tokenizer, vocab_size, stop_token_ids)
        self._cache: GrammarCache | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_input_processor(cls, processor) -> "LazyGrammarCache":
        """The cache for an InputProcessor's tokenizer, vocabulary and EOS ids (the grammar's stop tokens)."""
        eos = () if processor.eos_token_id is None else (processor.eos_token_id, *processor.other_eos_token_ids)
        return cls(processor.tokenizer, processor.vocab_size, eos)

    async def compile(self, structured: StructuredOutput):
        """GrammarCache.compile; the cache itself is built off the event loop too."""
        cache = self._cache or await asyncio.get_running_loop().run_in_executor(None, self.get)
        return await cache.compile(structured)

    def compile_blocking(self, structured: StructuredOutput):
        return self.get().compile_blocking(structured)

    def warm_up(self) -> None:
        """Build the cache ahead of the first structured request; a failure is left for that request."""
        try:
            self.get()
        except Exception:  # noqa: BLE001 - reported to the first request that needs the cache
            pass

    def get(self) -> GrammarCache:
        """The cache; GrammarCompileError (a 400) when xgrammar cannot read this model's tokenizer."""
        with self._lock:
            if self._cache is None:
                try:
                    self._cache = GrammarCache(*self._args)
                except Exception as exc:  # noqa: BLE001 - xgrammar's errors for tokenizers it cannot read
                    raise GrammarCompileError("structured outputs are not available for this model's tokenizer: "
                                              f"{_first_line(exc)}") from None
            return self._cache


def _key(structured: StructuredOutput) -> str:
    return hashlib.sha256(f"{structured.kind}\0{structured.spec}".encode()).hexdigest()


def _first_line(exc: Exception) -> str:
    """The error's first line without xgrammar's "[time] file.cc:line: " prefix."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)[:500]


def _json_schema(compiler, spec: str):
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as exc:
        raise GrammarCompileError(f"the JSON schema is not valid JSON: {exc}") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarCompileError("the JSON schema must be an object")
    return compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)


def _choice(compiler, spec: str):
    import xgrammar

    choices = json.loads(spec)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarCompileError("choice must be a non-empty list of strings")
    alternatives = " | ".join(json.dumps(c) for c in choices)
    return compiler.compile_grammar(xgrammar.Grammar.from_ebnf(f"root ::= {alternatives}"))


_COMPILERS = {
    "json_schema": _json_schema,
    "json_object": lambda compiler, spec: compiler.compile_json_schema('{"type": "object"}', any_whitespace=False),
    "regex": lambda compiler, spec: compiler.compile_regex(spec),
    "choice": _choice,
    "grammar": lambda compiler, spec: compiler.compile_grammar(spec),
    "structural_tag": lambda compiler, spec: compiler.compile_structural_tag(spec),
}
