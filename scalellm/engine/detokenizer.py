"""Incremental detokenization with stop strings, and the text of logprob tokens.

Text flows through three marks on one string:

    text:  |<----- released ----->|<- held ->|
           0               num_released   len(text)

`update` appends the newly decodable text and looks for stop strings; `get_next_delta` releases
everything except a held tail that could still grow into a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from scalellm.protocol.types import Logprob, SamplingParams

_INVALID_PREFIX_ERROR = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Turns one sample's output token ids into text, step by step, and finds its stop strings.

    Decoding goes through the `tokenizers` DecodeStream, which re-decodes only a short window of
    recent ids per token (O(new tokens) per step) and holds a token back while it ends inside a
    multi-byte UTF-8 character, so no released text ever ends in a half character. The output is
    decoded on its own, so the text matches `tokenizer.decode(output_ids, skip_special_tokens=...)`
    (leading spaces included); bytes of an unfinished character at the very end are dropped.
    `prompt_token_ids` are not needed for that and only kept for the caller's convenience.

    Stop strings are searched in the new text plus the last (longest stop - 1) characters before
    it; the earliest match wins (ties: the first listed). Feed EOS or stop token ids only if their
    text should appear (with skip_special_tokens=False).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.prompt_token_ids = prompt_token_ids
        self._tokenizer = backend_tokenizer(tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self._stops = _StopStrings(params.stop, params.include_stop_str_in_output)
        self._text = ""
        self._num_released = 0
        self.stop_reason: str | None = None
        """The stop string that ended the text, once one matched."""

    @property
    def output_text(self) -> str:
        """All text so far, held tail included; cut at a matched stop string (which it keeps only
        with include_stop_str_in_output)."""
        return self._text

    def resume(self, delivered_token_ids: list[int]) -> None:
        """Start after output that was already generated and delivered elsewhere (failover).

        The tokens are decoded as `update` would have (so the decode state across the seam is the
        same), nothing is searched for stop strings (the delivered text held none, or it would have
        ended), and the text counts as released except the tail an uninterrupted run would still
        hold back as a possible stop string: `get_next_delta` then releases exactly what the
        client has not seen. (Released text only grows: len(text) - held never decreases.)
        """
        pieces = [self._step(token_id) for token_id in delivered_token_ids]
        self._text += "".join(piece for piece in pieces if piece)
        self._num_released = len(self._text) - self._stops.num_chars_to_hold(self._text)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string they complete, else None.

        After a stop string matched, later tokens are ignored (and None is returned).
        """
        if self.stop_reason is not None:
            return None
        pieces = [self._step(token_id) for token_id in new_token_ids]
        new_text = "".join(piece for piece in pieces if piece)
        if not new_text:
            return None
        num_old_chars = len(self._text)
        self._text += new_text
        match = self._stops.find(self._text, num_old_chars)
        if match is not None:
            self._text, self.stop_reason = self._text[:match[0]], match[1]
        return self.stop_reason

    def get_next_delta(self, finished: bool = False) -> str:
        """The text that can be released since the last call.

        While unfinished, a tail that is the beginning of a stop string is held back; pass
        finished=True on the last call (EOS, length, abort) to release it. After a stop string
        matched everything is released.
        """
        end = len(self._text)
        if not (finished or self.stop_reason is not None):
            end = max(self._num_released, end - self._stops.num_chars_to_hold(self._text))
        delta = self._text[self._num_released:end]
        self._num_released = end
        return delta

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tokenizer, token_id)
        except Exception as error:  # the stream's state is broken by some odd byte sequences
            if _INVALID_PREFIX_ERROR not in str(error):
                raise
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._tokenizer, token_id)


class _StopStrings:
    """Finds stop strings in a growing text and tells how much of its tail could start one."""

    def __init__(self, stops: list[str], include_in_output: bool):
        self._stops = list(stops)
        self._include_in_output = include_in_output
        self._max_len = max((len(stop) for stop in stops), default=0)

    def find(self, text: str, num_old_chars: int) -> tuple[int, str] | None:
        """(where the text ends, the stop string) for the earliest stop string that ends after
        `num_old_chars`, or None. Earlier text was searched by previous calls."""
        start = max(0, num_old_chars - self._max_len + 1)
        best: tuple[int, str] | None = None
        for stop in self._stops:
            position = text.find(stop, start)
            if position >= 0 and (best is None or position < best[0]):
                best = (position, stop)
        if best is None:
            return None
        position, stop = best
        return (position + len(stop) if self._include_in_output else position), stop

    def num_chars_to_hold(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of a stop string."""
        for length in range(min(self._max_len - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0


def backend_tokenizer(tokenizer) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer (or the Tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; load the model's "
                         "tokenizer.json (AutoTokenizer with use_fast=True)")
    return backend


def decode_logprobs(tokenizer, logprobs: dict[int, Logprob]) -> dict[int, Logprob]:
    """Set decoded_token of every entry to its token's text; returns the same dict.

    Each token is decoded alone with the tokenizer's decoder (special tokens included, so
    "<|im_end|>" shows as itself). A token that holds only part of a multi-byte UTF-8 character
    decodes to U+FFFD ("\\ufffd") for the incomplete bytes; a SentencePiece token's leading space
    ("▁word") is dropped, as a decode of that token alone does.
    """
    token_ids = list(logprobs)
    texts = backend_tokenizer(tokenizer).decode_batch([[token_id] for token_id in token_ids],
                                                      skip_special_tokens=False)
    for token_id, text in zip(token_ids, texts):
        logprobs[token_id].decoded_token = text
    return logprobs
