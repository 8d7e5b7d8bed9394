"""Repetition, presence and frequency penalties, applied in place to the rows that ask for them.

Each penalty gathers the logits of the row's token ids, changes them and scatters them back, so
the cost grows with the number of token ids, not with rows x vocabulary. Token lists are padded
to one width by repeating a row's last id: a repeated id gets the same new value, so the scatter
stays deterministic.
"""

from __future__ import annotations

import torch

from scalellm.protocol.types import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    """Whether any penalty changes this row's logits."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, row_indices: list[int], params: list[SamplingParams],
                    prompt_token_ids: list[list[int]], output_token_ids: list[list[int]]) -> None:
    """Penalize `logits[row_indices]` [B, V] float32 in place; the lists hold one entry per row.

    - repetition penalty r, over tokens in the prompt or the output: a positive logit is divided
      by r, a negative one multiplied by r (CTRL / Hugging Face semantics);
    - then frequency penalty f and presence penalty p, over output tokens only (OpenAI):
      logit -= f * count(token) + p * (count(token) > 0).
    """
    repetition = [(i, r.repetition_penalty, prompt + output) for i, r, prompt, output
                  in zip(row_indices, params, prompt_token_ids, output_token_ids)
                  if r.repetition_penalty != 1.0 and (prompt or output)]
    if repetition:
        _apply_repetition(logits, *zip(*repetition))
    additive = [(i, p.frequency_penalty, p.presence_penalty, output) for i, p, output
                in zip(row_indices, params, output_token_ids)
                if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and output]
    if additive:
        _apply_frequency_presence(logits, *zip(*additive))


def _apply_repetition(logits: torch.Tensor, rows: tuple[int, ...], penalty: tuple[float, ...],
                      seen_ids: tuple[list[int], ...]) -> None:
    device = logits.device
    rows_index = torch.tensor(rows, device=device)[:, None]  # [N, 1]
    ids, _ = _padded(seen_ids, device)  # [N, L]
    values = logits[rows_index, ids]  # [N, L]
    r = torch.tensor(penalty, dtype=logits.dtype, device=device)[:, None]  # [N, 1]
    logits[rows_index, ids] = torch.where(values > 0, values / r, values * r)


def _apply_frequency_presence(logits: torch.Tensor, rows: tuple[int, ...],
                              frequency: tuple[float, ...], presence: tuple[float, ...],
                              output_ids: tuple[list[int], ...]) -> None:
    device, dtype = logits.device, logits.dtype
    rows_index = torch.tensor(rows, device=device)[:, None]  # [N, 1]
    ids, is_real = _padded(output_ids, device)  # [N, L]
    counts = torch.zeros(len(rows), logits.shape[1], dtype=dtype, device=device)  # [N, V]
    counts.scatter_add_(1, ids, is_real.to(dtype))
    count = counts.gather(1, ids)  # [N, L] occurrences of each listed id
    f = torch.tensor(frequency, dtype=dtype, device=device)[:, None]  # [N, 1]
    p = torch.tensor(presence, dtype=dtype, device=device)[:, None]  # [N, 1]
    values = logits[rows_index, ids]  # [N, L]
    logits[rows_index, ids] = values - f * count - p * (count > 0).to(dtype)


def _padded(token_ids: tuple[list[int], ...],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-empty id lists as one [N, L] int64 tensor padded with each row's last id, and a
    [N, L] bool mask of the real (not padding) entries."""
    width = max(len(ids) for ids in token_ids)
    padded = [ids + [ids[-1]] * (width - len(ids)) for ids in token_ids]
    lengths = torch.tensor([len(ids) for ids in token_ids], device=device)[:, None]  # [N, 1]
    is_real = torch.arange(width, device=device)[None, :] < lengths  # [N, L]
    return torch.tensor(padded, dtype=torch.int64, device=device), is_real
