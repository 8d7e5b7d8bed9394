"""The sampler: one token per row of a batch's logits, plus logprobs when asked.

Per step, for the rows that need it (all in float32):

    raw logits ──▶ logprobs: log_softmax of the raw logits (rows with params.logprobs)
        │
        ├──▶ grammar masks: -inf on the tokens a row's grammar forbids (structured outputs)
        │
        ├──▶ penalties: repetition (prompt + output), frequency and presence (output)
        │
        ├──▶ greedy rows (temperature 0): argmax
        └──▶ random rows: / temperature ─▶ top-k ─▶ top-p ─▶ min-p ─▶ softmax ─▶ exponential race

An all-greedy batch without penalties or logprobs is a single argmax. min_tokens, EOS and stop
handling live in the scheduler; the sampler never changes EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scalellm.engine.sampling.filters import apply_min_p, apply_top_k, apply_top_p
from scalellm.engine.sampling.logprobs import compute_logprobs
from scalellm.engine.sampling.penalties import apply_penalties, needs_penalties
from scalellm.engine.sampling.random_draw import draw_exponential_race
from scalellm.engine.structured.matcher import GrammarMasker
from scalellm.protocol.types import Logprob, SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the batch's logits."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    """Set for requests with a seed (see make_generator); None draws from the sampler's own."""
    grammar: object | None = None
    """The request's RequestGrammar when its output is constrained; it is read here, never advanced."""


@dataclass
class SamplerOutput:
    """The sampled token of every row, and the logprobs of the rows that asked for them."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded request, on the device of the logits it will sample from."""
    return torch.Generator(device=device).manual_seed(seed)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token per row [B]; ties (and NaN) resolve to the first such index.

    float32 logits on the CPU go through numpy's argmax, which is vectorized where torch's reductions
    over a row are not: 13 against 130 us for a row of 49,152, 0.16 against 1.7 ms for 32 rows."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.argmax(logits.numpy(), axis=-1))
    return logits.max(dim=-1).indices


class Sampler:
    """Samples one token per row; stateless apart from its own generator for unseeded rows."""

    def __init__(self, seed: int = 0):
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._masker = GrammarMasker()

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample from `logits` [B, V] (any float dtype), row i following rows[i]."""
        if len(rows) != logits.shape[0]:
            raise ValueError(f"got {logits.shape[0]} rows of logits for {len(rows)} sampling rows")
        wants_logprobs = any(row.params.logprobs is not None for row in rows)
        masked = self._masker.apply(logits, [row.grammar for row in rows], in_place=not wants_logprobs)
        if all(_is_plain_greedy(row.params) for row in rows):
            return SamplerOutput(greedy_ids(masked).tolist(), [None] * len(rows))
        processed = self._penalized(masked, rows)  # [B, V] float32
        token_ids = torch.empty(len(rows), dtype=torch.int64, device=logits.device)  # [B]
        self._sample_greedy(processed, rows, token_ids)
        self._sample_random(processed, rows, token_ids)
        return SamplerOutput(token_ids.tolist(), _logprobs(logits, rows, token_ids))

    def _penalized(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Float32 logits with penalties applied; never modifies `logits` itself (the grammar-masked
        logits when a row has a grammar, else the raw ones)."""
        selected = [i for i, row in enumerate(rows) if needs_penalties(row.params)]
        if not selected:
            return logits.float()
        processed = logits.to(torch.float32, copy=True)  # [B, V]
        apply_penalties(processed, selected, [rows[i].params for i in selected],
                        [rows[i].prompt_token_ids for i in selected],
                        [rows[i].output_token_ids for i in selected])
        return processed

    def _sample_greedy(self, logits: torch.Tensor, rows: list[SamplingRow],
                       token_ids: torch.Tensor) -> None:
        selected = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(selected) == len(rows):
            token_ids.copy_(greedy_ids(logits))
        elif selected:
            index = torch.tensor(selected, device=logits.device)
            token_ids[index] = greedy_ids(logits[index])

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow],
                       token_ids: torch.Tensor) -> None:
        selected = [i for i, row in enumerate(rows) if not row.params.greedy]
        if not selected:
            return
        params = [rows[i].params for i in selected]
        index = torch.tensor(selected, device=logits.device)
        temperature = torch.tensor([p.temperature for p in params],
                                   dtype=torch.float32, device=logits.device)[:, None]  # [N, 1]
        source = logits if len(selected) == len(rows) else logits[index]  # [N, V]
        scaled = source / temperature  # [N, V], a new tensor
        apply_top_k(scaled, [p.top_k for p in params])
        apply_top_p(scaled, [p.top_p for p in params])
        apply_min_p(scaled, [p.min_p for p in params])
        probs = scaled.softmax(dim=-1)  # [N, V]
        generators = [rows[i].generator for i in selected]
        token_ids[index] = draw_exponential_race(probs, generators, self._generator(logits.device))

    def _generator(self, device: torch.device) -> torch.Generator:
        """The sampler's own generator on `device`, seeded with its seed on first use."""
        if device not in self._generators:
            self._generators[device] = make_generator(self._seed, device)
        return self._generators[device]


def _is_plain_greedy(params: SamplingParams) -> bool:
    return params.greedy and params.logprobs is None and not needs_penalties(params)


def _logprobs(logits: torch.Tensor, rows: list[SamplingRow],
              token_ids: torch.Tensor) -> list[dict[int, Logprob] | None]:
    """Logprobs of the rows that asked for them (from the raw logits), None for the others."""
    selected = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    result: list[dict[int, Logprob] | None] = [None] * len(rows)
    if not selected:
        return result
    index = torch.tensor(selected, device=logits.device)
    dicts = compute_logprobs(logits[index], token_ids[index],
                             [rows[i].params.logprobs for i in selected])
    for i, row_logprobs in zip(selected, dicts):
        result[i] = row_logprobs
    return result
