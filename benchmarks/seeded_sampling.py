"""Micro-benchmark of seeded sampling per step: one generator per request that keeps its state (the
draws depend on the replica's history) against one re-seeded from (seed, sample, position) before each
draw (what the model runner does, so a request resumed on another replica draws the same tokens).

Each row: microseconds per sampler step for B seeded rows over a vocabulary of V (best of 5), and
the re-seeding alone (position_seed + manual_seed for every row).

    .venv/bin/python benchmarks/seeded_sampling.py --threads 1 --batch 1,8,32
"""

from __future__ import annotations

import argparse
import time

import torch

from scalellm.engine.sampler import Sampler, SamplingRow, make_generator
from scalellm.engine.sampling.random_draw import position_seed
from scalellm.protocol.types import SamplingParams


def best_time_us(fn, repeats: int) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return 1e6 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", default="1,8,32", help="comma-separated numbers of seeded rows")
    parser.add_argument("--vocab", type=int, default=49152, help="SmolLM2's vocabulary by default")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    print(f"threads {args.threads}, vocab {args.vocab}")
    print(f"{'rows':>5} {'kept state us':>14} {'re-seeded us':>13} {'re-seeding alone us':>20}")
    for batch in map(int, args.batch.split(",")):
        logits = torch.randn(batch, args.vocab)
        rows = [SamplingRow(params, [1, 2, 3], [], make_generator(1234 + i, "cpu")) for i in range(batch)]
        sampler = Sampler()
        position = [0]

        def reseed() -> None:
            position[0] += 1
            for i, row in enumerate(rows):
                row.generator.manual_seed(position_seed(params.seed, i, position[0]))

        def reseeded_step() -> None:
            reseed()
            sampler(logits, rows)

        kept = best_time_us(lambda: sampler(logits, rows), args.repeats)
        reseeded = best_time_us(reseeded_step, args.repeats)
        alone = best_time_us(reseed, args.repeats * 50)
        print(f"{batch:>5} {kept:>14.1f} {reseeded:>13.1f} {alone:>20.1f}")


if __name__ == "__main__":
    main()
