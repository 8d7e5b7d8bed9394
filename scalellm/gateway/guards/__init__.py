"""Guardrails at the gateway: guards by name (a registry), and the guard policy of each API key.

A guard is written as a spec, on the command line (`--guard SPEC`, repeatable, for every key) and
per key in the key file (`guard=SPEC`, see auth.py):

    pii               refuse prompts holding an e-mail address, phone or card number; mask them in replies
    pii:redact        the same, but replace them in the prompt instead of refusing it
    deny:FILE         regular expressions (one a line) refusing prompts and ending replies
    moderation:URL[,timeout=S][,fail=open|closed]       an external moderation endpoint
    moderation:served[,template=FILE][,max_tokens=N][,timeout=S][,fail=open|closed]
                      the served model asked through a prompt template

`GuardPolicy` holds the guards of every key and checks requests (before routing) and replies (a
`GuardedStream` over the replica's stream); blocked prompts are a 400 in OpenAI's error format with
code "content_filter", blocked replies end with finish_reason "content_filter".
"""

from __future__ import annotations

from scalellm.gateway.guards.base import Guard, GuardContext, GuardError, Verdict
from scalellm.gateway.guards.policy import GuardPolicy
from scalellm.gateway.guards.registry import create_guard, guard_names
from scalellm.gateway.guards.stream import FINISH_CONTENT_FILTER, GuardedStream, ReplyFilter

__all__ = ["Guard", "GuardContext", "GuardError", "GuardPolicy", "GuardedStream", "ReplyFilter", "Verdict",
           "FINISH_CONTENT_FILTER", "create_guard", "guard_names"]
