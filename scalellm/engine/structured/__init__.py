"""Structured outputs: grammars compiled from schemas, regexes and EBNF, enforced by token masks.

    asyncio thread                              engine thread
    ──────────────                              ─────────────
    GrammarCache.compile(spec) ─ thread pool ─▶ Request.grammar (a RequestGrammar)
      (bounded LRU by hash, deadline → 400)     sampler: fill bitmask → -inf on forbidden tokens
                                                scheduler: accept the sampled token, stop when done
"""

from scalellm.engine.structured.compiler import GrammarCache, GrammarCompileError, LazyGrammarCache
from scalellm.engine.structured.matcher import GrammarMasker, RequestGrammar, attach_grammars

__all__ = ["GrammarCache", "GrammarCompileError", "LazyGrammarCache", "GrammarMasker", "RequestGrammar",
           "attach_grammars"]
