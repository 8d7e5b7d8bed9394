"""Draw one token per row by an exponential race, each seeded row from its own generator.

token = argmax_j(p_j / q_j) with q_j ~ Exp(1) i.i.d. picks token j with probability p_j (the
first of independent exponential clocks with rates p_j to ring). q = -log(u), u ~ U[0, 1), is
never 0 (at worst +inf, which only loses the race), so no NaN can reach the argmax; it is also
several times faster than torch's exponential_ on the CPU.

A seeded row draws exactly V uniforms from its own generator per sample, so its tokens depend
only on its seed, its logits and how many samples it drew before, never on the rest of the batch.
"""

from __future__ import annotations

import torch


def draw_exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None],
                          default_generator: torch.Generator) -> torch.Tensor:
    """Sample one token id per row of `probs` [N, V]; returns [N] int64.

    Rows whose generator is None draw from `default_generator` in one batched call (so their
    draws do depend on the batch); the others each draw from their own generator.
    """
    u = torch.empty_like(probs)  # [N, V]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        u.uniform_(generator=default_generator)
    elif unseeded:
        index = torch.tensor(unseeded, device=probs.device)
        u[index] = torch.rand(len(unseeded), probs.shape[1], dtype=probs.dtype,
                              device=probs.device, generator=default_generator)
    for i, generator in enumerate(generators):
        if generator is not None:
            u[i].uniform_(generator=generator)
    q = u.log_().neg_()  # [N, V] ~ Exp(1)
    return (probs / q).argmax(dim=-1)
