"""Grammar compile time on a model's tokenizer: the tables built once per replica, then a schema's
first compile and a repeat (a cache hit), plus json_object and a regex; then what masking costs a
decode step of 16 requests that follow the schema (fill 16 bitmasks, mask the logits, advance).

    python benchmarks/structured/compile_time.py "$(../shared/models/fetch.sh qwen2.5-coder-1.5b)"
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from scalellm.engine.input_processor import InputProcessor
from scalellm.engine.loader import open_model_files
from scalellm.engine.structured import LazyGrammarCache
from scalellm.engine.structured.matcher import GrammarMasker, RequestGrammar
from scalellm.protocol.types import StructuredOutput

SCHEMA = Path(__file__).with_name("schema10.json")


def mask_cost_ms(compiled, vocab_size: int, rows: int = 16, steps: int = 40) -> float:
    """Mean milliseconds per step of masking `rows` requests' logits and advancing their grammars."""
    import torch

    grammars = [RequestGrammar(compiled) for _ in range(rows)]
    masker = GrammarMasker()
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for step in range(steps + 1):  # the first, untimed, loads the kernel
        logits = torch.randn(rows, vocab_size, generator=generator)
        start = time.perf_counter()
        chosen = masker.apply(logits, grammars, in_place=True).argmax(dim=1).tolist()
        for grammar, token_id in zip(grammars, chosen):
            grammar.accept(token_id)
        total += (time.perf_counter() - start) if step else 0.0
    return total / steps * 1000


async def measure(cache, specs: list[tuple[str, StructuredOutput]]) -> None:
    for label, spec in specs:
        start = time.perf_counter()
        await cache.compile(spec)
        print(f"{label}: {(time.perf_counter() - start) * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .gguf file or Hugging Face directory")
    parser.add_argument("--schema", type=Path, default=SCHEMA)
    args = parser.parse_args()
    files = open_model_files(args.model)
    tokenizer = files.load_tokenizer()
    processor = InputProcessor(tokenizer, files.config.vocab_size, 4096, files.config.eos_token_ids)
    start = time.perf_counter()
    cache = LazyGrammarCache.for_input_processor(processor).get()
    print(f"tokenizer tables (once per replica): {(time.perf_counter() - start) * 1000:.0f} ms")
    schema = StructuredOutput("json_schema", args.schema.read_text())
    asyncio.run(measure(cache, [("schema first", schema), ("schema repeat", schema),
                                ("json_object first", StructuredOutput("json_object")),
                                ("regex first", StructuredOutput("regex", r"\d{3}-\d{4}"))]))
    compiled = cache.compile_blocking(schema)
    print(f"masking a 16-request decode step: {mask_cost_ms(compiled, files.config.vocab_size):.2f} ms")


if __name__ == "__main__":
    main()
