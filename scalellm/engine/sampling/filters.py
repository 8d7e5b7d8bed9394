"""Top-k, top-p and min-p filters over temperature-scaled logits: excluded tokens become -inf.

They run in this order (as in Hugging Face's warpers): top-k, then top-p over the distribution
renormalized after top-k, then min-p (a ratio to the most likely token, so the order does not
change it). Ties at a cut-off keep every tied token. Each filter only touches the rows that
enable it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

TOP_P_CANDIDATES = 256
"""Tokens examined first for the top-p cut-off; most rows find it among them."""


def apply_top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    """Keep the top_k[i] largest logits of row i (0 disables it); in place on [N, V] logits."""
    vocab_size = logits.shape[1]
    _on_rows(logits, [0 < k < vocab_size for k in top_k], top_k, _top_k)


def apply_top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Keep the fewest most likely tokens whose probability reaches top_p[i]; in place."""
    _on_rows(logits, [p < 1.0 for p in top_p], top_p, _top_p)


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """Drop tokens whose probability is below min_p[i] times the top token's; in place."""
    _on_rows(logits, [m > 0.0 for m in min_p], min_p, _min_p)


def _on_rows(logits: torch.Tensor, enabled: list[bool], values: list,
             fn: Callable[[torch.Tensor, list], None]) -> None:
    """Run `fn(rows, their values)` on the enabled rows only, writing the result back."""
    if all(enabled):
        fn(logits, values)
        return
    rows = [i for i, on in enumerate(enabled) if on]
    if not rows:
        return
    index = torch.tensor(rows, device=logits.device)
    sub = logits[index]  # [n, V]
    fn(sub, [values[i] for i in rows])
    logits[index] = sub


def _top_k(logits: torch.Tensor, top_k: list[int]) -> None:
    values = logits.topk(max(top_k), dim=-1).values  # [N, K]
    index = torch.tensor(top_k, device=logits.device)[:, None] - 1  # [N, 1]
    kth = values.gather(1, index)  # [N, 1]
    logits.masked_fill_(logits < kth, -math.inf)


def _top_p(logits: torch.Tensor, top_p: list[float]) -> None:
    """Find each row's cut-off among its top candidates; rows whose candidates do not reach
    top_p (flat distributions) fall back to a full sort, which is much slower on the CPU."""
    num_candidates = min(logits.shape[1], TOP_P_CANDIDATES)
    threshold, covered = _top_p_threshold(logits, top_p, num_candidates)  # [N, 1], [N]
    uncovered = (~covered).nonzero()[:, 0].tolist()
    if uncovered:
        index = torch.tensor(uncovered, device=logits.device)
        threshold[index], _ = _top_p_threshold(logits[index], [top_p[i] for i in uncovered],
                                               logits.shape[1])
    logits.masked_fill_(logits < threshold, -math.inf)


def _top_p_threshold(logits: torch.Tensor, top_p: list[float],
                     num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest logit to keep per row [N, 1], and whether the candidates reached top_p [N]."""
    top = logits.topk(num_candidates, dim=-1).values  # [N, K] descending
    probs = (top - logits.logsumexp(dim=-1, keepdim=True)).exp()  # [N, K]
    mass = probs.cumsum(dim=-1)  # [N, K]
    p = torch.tensor(top_p, dtype=logits.dtype, device=logits.device)[:, None]  # [N, 1]
    num_kept = (mass - probs < p).sum(dim=-1, keepdim=True).clamp_(min=1)  # [N, 1]
    covered = mass[:, -1] >= p[:, 0]  # [N]
    return top.gather(1, num_kept - 1), covered | (num_candidates == logits.shape[1])


def _min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    # p_j < min_p * p_max  <=>  logit_j < logit_max + log(min_p): no softmax needed.
    log_min_p = torch.tensor([math.log(m) for m in min_p],
                             dtype=logits.dtype, device=logits.device)[:, None]  # [N, 1]
    threshold = logits.amax(dim=-1, keepdim=True) + log_min_p  # [N, 1]
    logits.masked_fill_(logits < threshold, -math.inf)
