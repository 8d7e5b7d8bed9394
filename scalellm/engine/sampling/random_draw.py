"""Draw one token per row by an exponential race, each seeded row from its own generator.

token = argmax_j(p_j / q_j) with q_j ~ Exp(1) i.i.d. picks token j with probability p_j (the
first of independent exponential clocks with rates p_j to ring). q = -log(u), u ~ U[0, 1), is
never 0 (at worst +inf, which only loses the race), so no NaN can reach the argmax; it is also
several times faster than torch's exponential_ on the CPU.

A seeded row draws V uniforms from its own generator, which the model runner re-seeds before each
draw with `position_seed(seed, sample, position)`: its tokens depend only on its seed, its logits
and the output position, never on the rest of the batch nor on what the replica drew before, so
a request resumed on another replica continues exactly as it would have.
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


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of splitmix64 (Steele et al.): a bijective 64-bit mix with good avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_seed(seed: int, sample_index: int, position: int) -> int:
    """The generator seed for drawing output token `position` of sample `sample_index` of a request
    seeded with `seed` (any int64): distinct inputs give unrelated seeds, in [0, 2**63)."""
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ sample_index)
    return _splitmix64(x ^ position) >> 1
