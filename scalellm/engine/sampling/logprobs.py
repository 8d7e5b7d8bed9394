"""Log-probabilities of the chosen token and the top alternatives, from the raw logits."""

from __future__ import annotations

import torch

from scalellm.protocol.types import Logprob


def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                     num_top: list[int]) -> list[dict[int, Logprob]]:
    """Per row: the chosen token's Logprob plus the num_top[i] most likely tokens.

    `raw_logits` [N, V] are the model's logits before temperature, penalties and filters (vLLM's
    default), so a logprob describes the model, not the sampling settings. Rank 1 is the most
    likely token; a chosen token's rank is 1 + the number of tokens strictly more likely. The
    chosen token comes first in each dict; when it is also among the top alternatives it appears
    once, so a dict holds num_top or num_top + 1 entries. decoded_token is left None.
    """
    logprobs = torch.log_softmax(raw_logits.float(), dim=-1)  # [N, V]
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [N]
    max_top = max(num_top)
    top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (None, None)  # [N, K]
    rows = _to_lists(token_ids, chosen[:, 0], ranks, top_values, top_ids)
    return [_row_dict(*row, k) for row, k in zip(rows, num_top)]


def _to_lists(token_ids, chosen, ranks, top_values, top_ids) -> list[tuple]:
    """One device-to-host transfer per tensor, then plain Python."""
    n = len(token_ids)
    tops = (top_values.tolist(), top_ids.tolist()) if top_values is not None else ([[]] * n,) * 2
    return list(zip(token_ids.tolist(), chosen.tolist(), ranks.tolist(), *tops))


def _row_dict(token_id: int, logprob: float, rank: int, top_values: list[float],
              top_ids: list[int], num_top: int) -> dict[int, Logprob]:
    row = {token_id: Logprob(logprob, rank)}
    for position in range(num_top):
        row.setdefault(top_ids[position], Logprob(top_values[position], position + 1))
    return row
