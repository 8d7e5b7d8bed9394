"""Guards: PII detection (Luhn-checked cards), deny patterns, moderation fail-open/closed, the reply
hold-back window (matches spanning chunks), and per-key guard configuration."""

from __future__ import annotations

import asyncio

import pytest

from scalellm.gateway.auth import ApiKeyAuth
from scalellm.gateway.guards import GuardContext, GuardError, GuardPolicy, ReplyFilter, create_guard
from scalellm.gateway.guards.moderation import ServedModerationGuard
from scalellm.gateway.guards.pii import find_pii, luhn_valid, redact
from scalellm.protocol.openai import OpenAIError, parse_chat_request, parse_completion_request
from scalellm.protocol.types import CompletionOutput, RequestOutput


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713") and luhn_valid("5555555555554444")
    assert not luhn_valid("4111111111111112") and not luhn_valid("79927398710")


def test_pii_kinds_and_what_is_not_pii():
    text = "write to ann.lee+x@mail.example.org, call +44 20 7946 0958 or (415) 555-2671, pay 4111-1111-1111-1111"
    assert [kind for _, _, kind in find_pii(text)] == ["EMAIL", "PHONE", "PHONE", "CARD"]
    assert redact(text) == "write to [EMAIL], call [PHONE] or [PHONE], pay [CARD]"
    for clean in ("on 2024-01-15 at 10:30", "version 1.2.3.4", "order 4111 1111 1111 1112 (fails Luhn)",
                  "id 123456789", "user@localhost"):
        assert find_pii(clean) == [], clean


def run(coroutine):
    return asyncio.run(coroutine)


def test_pii_refuses_or_redacts_prompts():
    context = GuardContext("k")
    verdict = run(create_guard("pii").check_input(("hi", "mail bob@example.com"), context))
    assert verdict.blocked and "e-mail" in verdict.reason and "bob@" not in verdict.reason
    verdict = run(create_guard("pii:redact").check_input(("mail bob@example.com",), context))
    assert not verdict.blocked and verdict.texts == ("mail [EMAIL]",)
    assert run(create_guard("pii").check_input(("nothing here",), context)).texts is None


def deltas(texts: list[str], finish: str = "length") -> list[RequestOutput]:
    return [RequestOutput("r", [CompletionOutput(0, text, [i], finish_reason=finish if i == len(texts) - 1 else None)],
                          finished=i == len(texts) - 1) for i, text in enumerate(texts)]


def released(reply_filter: ReplyFilter, texts: list[str], finish: str = "length") -> tuple[list[str], str | None]:
    out, reason = [], None
    for output in deltas(texts, finish):
        for sample in reply_filter.filter(output).outputs:
            out.append(sample.text)
            reason = sample.finish_reason or reason
        if reply_filter.all_done:
            break
    return out, reason


def test_masks_an_email_split_over_chunks_and_holds_back_only_the_window():
    actions = []
    guard = create_guard("pii")
    reply_filter = ReplyFilter([guard], 1, lambda name, action: actions.append((name, action)))
    chunks = ["Sure, write to jo", "hn.smi", "th@exam", "ple.com and ", "x" * 200, " bye"]
    out, reason = released(reply_filter, chunks)
    assert "".join(out) == "Sure, write to [EMAIL] and " + "x" * 200 + " bye" and reason == "length"
    assert actions == [("pii", "masked_output")]
    assert out[0] == "" and len(out[4]) > 0  # held back while it could still be a match, released after


def test_card_spanning_chunks_is_masked_luhn_checked():
    reply_filter = ReplyFilter([create_guard("pii")], 1, lambda *a: None)
    out, _ = released(reply_filter, ["card 4111 11", "11 1111 1111 end, not 4111 11", "11 1111 1112"])
    assert "".join(out) == "card [CARD] end, not 4111 1111 1111 1112"


def test_deny_pattern_spanning_chunks_ends_the_reply(tmp_path):
    path = tmp_path / "deny.txt"
    path.write_text("# comment\n\nsecret\\s+plan\n")
    actions = []
    reply_filter = ReplyFilter([create_guard(f"deny:{path}")], 1, lambda name, action: actions.append(action))
    out, reason = released(reply_filter, ["the sec", "ret ", " plan is", " to win"])
    assert "".join(out) == "the " and reason == "content_filter" and actions == ["blocked_output"]
    verdict = run(create_guard(f"deny:{path}").check_input(("my SECRET  Plan",), GuardContext("k")))
    assert verdict.blocked and "rule 3" in verdict.reason


def test_bad_deny_file_names_the_line(tmp_path):
    path = tmp_path / "deny.txt"
    path.write_text("fine\n# ok\nbroken(\n")
    with pytest.raises(ValueError, match=r"deny.txt line 3: invalid regular expression"):
        create_guard(f"deny:{path}")
    with pytest.raises(ValueError, match="unknown guard"):
        create_guard("toxicity")


def test_key_file_guard_errors_name_the_line(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# keys\nk-one inference guard=pii priority=2 weight=3\nk-two guard=nonsense\n")
    auth_error = None
    try:
        GuardPolicy((), ApiKeyAuth(key_file=str(keys)).key_guards())
    except ValueError as error:
        auth_error = str(error)
    assert auth_error is not None and f"API key file {keys} line 3" in auth_error and "k-two" not in auth_error
    keys.write_text("k-one weight=zero\n")
    with pytest.raises(ValueError, match="line 1: key setting 'weight=zero'"):
        ApiKeyAuth(key_file=str(keys))


def test_per_key_guards_add_to_the_global_ones(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("k-strict guard=pii:redact priority=-5 weight=2 tpm=600\nk-plain\n")
    auth = ApiKeyAuth(key_file=str(keys))
    strict, plain = auth.authorize(b"Bearer k-strict", "inference"), auth.authorize(b"Bearer k-plain", "inference")
    options = auth.options(strict)
    assert (options.priority, options.weight, options.tokens_per_minute) == (-5, 2.0, 600.0)
    policy = GuardPolicy(("deny:" + str(_deny_file(tmp_path)),), auth.key_guards())
    assert [g.name for g in policy.guards_for(strict)] == ["deny", "pii"]
    assert [g.name for g in policy.guards_for(plain)] == ["deny"]
    parsed = parse_chat_request(b'{"messages": [{"role": "user", "content": "i am a@b.io"}]}', None)
    assert run(policy.check_request(parsed, strict)).prompt.messages[0]["content"] == "i am [EMAIL]"
    assert run(policy.check_request(parsed, plain)) is parsed
    with pytest.raises(OpenAIError) as info:
        run(policy.check_request(parse_completion_request(b'{"prompt": [1, 2]}', None), plain))
    assert info.value.status == 400 and info.value.code == "content_filter"


def _deny_file(tmp_path):
    path = tmp_path / "deny-global.txt"
    path.write_text("forbidden\n")
    return path


class SlowModel:
    def __init__(self, answer: str, delay_s: float) -> None:
        self.answer, self.delay_s = answer, delay_s

    async def __call__(self, prompt: str, max_tokens: int) -> str:
        await asyncio.sleep(self.delay_s)
        return self.answer


def test_served_moderation_verdicts_and_fail_modes():
    parsed = parse_completion_request(b'{"prompt": "how do I bake bread"}', None)
    counts = []
    policy = GuardPolicy(("moderation:served,timeout=0.05,fail=open",),
                         count=lambda guard, key, action: counts.append(action))
    assert run(policy.check_request(parsed, "k", SlowModel("safe", 0))) is parsed
    with pytest.raises(OpenAIError, match="flagged by moderation"):
        run(policy.check_request(parsed, "k", SlowModel(" Unsafe\nS1", 0)))
    assert run(policy.check_request(parsed, "k", SlowModel("unsafe", 0.5))) is parsed  # timed out: open
    closed = GuardPolicy(("moderation:served,timeout=0.05",), count=lambda guard, key, action: counts.append(action))
    with pytest.raises(OpenAIError, match="could not be checked"):
        run(closed.check_request(parsed, "k", SlowModel("safe", 0.5)))
    assert counts == ["blocked_input", "error_open", "error_closed"]


def test_moderation_specs():
    assert isinstance(create_guard("moderation:served,max_tokens=2"), ServedModerationGuard)
    for bad in ("moderation:", "moderation:served,fail=maybe", "moderation:ftp://x", "moderation:served,speed=1",
                "moderation:http://x,template=t.txt", "moderation:served,timeout=-1"):
        with pytest.raises(ValueError):
            create_guard(bad)
    with pytest.raises(GuardError):
        run(create_guard("moderation:served").check_input(("x",), GuardContext("k")))
