"""Turning user input (text, token ids, chat) into engine Requests, with the checks users need."""

from __future__ import annotations

import json
import time
from typing import Sequence

from scalellm.engine.request import Request
from scalellm.protocol.types import ChatPrompt, InfillPrompt, PromptInput, ResumedSample, SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
"""Fill-in-the-middle markers (Qwen2.5-Coder, StarCoder-style templates): prefix, suffix, middle."""


class InputProcessor:
    """Tokenizes prompts and renders chat templates; raises ValueError for input that cannot be served."""

    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, eos_token_ids: tuple[int, ...]) -> None:
        """eos_token_ids: every id that ends generation like EOS; the tokenizer's EOS when empty."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        if not eos_token_ids and tokenizer.eos_token_id is not None:
            eos_token_ids = (tokenizer.eos_token_id,)
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.other_eos_token_ids = tuple(eos_token_ids[1:])

    @classmethod
    def for_core(cls, core, tokenizer) -> "InputProcessor":
        """The input processor matching an EngineCore's model and context length."""
        model_config = core.files.config
        return cls(tokenizer, model_config.vocab_size, core.max_model_len, model_config.eos_token_ids)

    def tokenize(self, prompt: PromptInput) -> list[int]:
        if isinstance(prompt, ChatPrompt):
            text = self.render_chat(prompt)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, InfillPrompt):
            return self.tokenizer.encode(self.render_infill(prompt), add_special_tokens=False)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
            return list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def render_chat(self, chat: ChatPrompt) -> str:
        messages = [_normalize_message(m, i) for i, m in enumerate(chat.messages or [])]
        if not messages:
            raise ValueError("messages must be a non-empty list")
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this model has no chat template; use the completions API")
        if chat.tools and not template_reads_tools(template):
            raise ValueError("this model's chat template cannot render tools (it never reads a 'tools' variable); "
                             "send the request without 'tools'")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tools=chat.tools or None, tokenize=False,
                add_generation_prompt=chat.add_generation_prompt)
        except Exception as exc:  # jinja raises TemplateError and others for conversations it rejects
            raise ValueError(f"the chat template rejected the conversation: {exc}") from None

    def render_infill(self, prompt: InfillPrompt) -> str:
        """The fill-in-the-middle prompt; ValueError when the vocabulary lacks the FIM markers."""
        vocab = self.tokenizer.get_vocab()
        if not all(marker in vocab for marker in FIM_TOKENS):
            raise ValueError("this model does not support fill-in-the-middle: 'suffix' needs a vocabulary with "
                             + ", ".join(FIM_TOKENS))
        prefix, suffix, middle = FIM_TOKENS
        return f"{prefix}{prompt.prefix}{suffix}{prompt.suffix}{middle}"

    def make_requests(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                      arrival_time: float | None = None,
                      resumed_samples: Sequence[ResumedSample] = ()) -> list[Request]:
        """One Request per sample; ids are request_id, or request_id#i for sample i when n > 1.

        resumed_samples: the samples of this request a failed replica left unfinished; when given,
        only these become Requests, each as sample `index` (its seeding and its outputs' index) that
        starts with the tokens already delivered as its output: they are prefilled with the prompt,
        count toward max_tokens, min_tokens and the penalties, and generation continues after them.
        """
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("the prompt is empty")
        if num_prompt >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt} tokens but the model's context is "
                             f"{self.max_model_len} tokens; shorten the prompt")
        room = self.max_model_len - num_prompt
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self._check_resumed(resumed_samples, params, max_tokens)
        samples = sorted(resumed_samples or [ResumedSample(index) for index in range(params.n)],
                         key=lambda sample: sample.index)
        arrival = arrival_time or time.time()
        return [Request(request_id=request_id if params.n == 1 else f"{request_id}#{s.index}",
                        prompt_token_ids=prompt_token_ids, sampling_params=params, max_tokens=max_tokens,
                        eos_token_id=self.eos_token_id, other_eos_token_ids=self.other_eos_token_ids,
                        sample_index=s.index, arrival_time=arrival, output_token_ids=list(s.token_ids),
                        all_token_ids=prompt_token_ids + list(s.token_ids),
                        resumed_cumulative_logprob=s.cumulative_logprob or 0.0)
                for s in samples]

    def _check_resumed(self, resumed_samples: Sequence[ResumedSample], params: SamplingParams,
                       max_tokens: int) -> None:
        seen: set[int] = set()
        for sample in resumed_samples:
            if not (isinstance(sample.index, int) and 0 <= sample.index < params.n):
                raise ValueError(f"resumed sample index {sample.index} is not a sample of this request "
                                 f"(n = {params.n}); send indices in [0, {params.n})")
            if sample.index in seen:
                raise ValueError(f"resumed sample index {sample.index} is listed twice; list each sample once")
            seen.add(sample.index)
            if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in sample.token_ids):
                raise ValueError(f"resumed output token ids must be integers in [0, {self.vocab_size}) "
                                 f"(sample {sample.index})")
            if len(sample.token_ids) >= max_tokens:
                raise ValueError(f"resumed sample {sample.index} already has {len(sample.token_ids)} output "
                                 f"tokens of the {max_tokens} it may generate; nothing is left to resume")


def template_reads_tools(template) -> bool:
    """Whether a chat template (the file's jinja source) reads the `tools` variable anywhere."""
    import jinja2
    from jinja2 import meta

    environment = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    sources = template.values() if isinstance(template, dict) else [template]
    for source in map(str, sources):
        try:
            if "tools" in meta.find_undeclared_variables(environment.parse(source)):
                return True
        except jinja2.TemplateSyntaxError:  # a tag of transformers' own environment: judge by the text
            if "tools" in source:
                return True
    return False


def _normalize_message(message, index: int) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be an object with role and content")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}].content parts must be text parts")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ValueError(f"messages[{index}].content must be a string or a list of text parts")
    normalized = {"role": role, "content": content}
    if role == "assistant" and message.get("tool_calls"):
        normalized["tool_calls"] = [_template_tool_call(call) for call in message["tool_calls"]]
    for key in ("tool_call_id", "name"):
        if isinstance(message.get(key), str):
            normalized[key] = message[key]
    return normalized


def _template_tool_call(call: dict) -> dict:
    """A tool call as chat templates expect it: arguments as an object when they are JSON (templates
    apply `tojson` to them), with the OpenAI shape kept ({"id", "type", "function": {...}})."""
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {**call, "function": function, **function}
