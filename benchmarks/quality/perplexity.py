"""Perplexity of the real GGUF models on a fixed English and a fixed code text: ours beside llama.cpp's
`llama-perplexity` on the same file and text, computed the same way.

llama-perplexity cuts the tokenized text into chunks of --ctx tokens (the first token of each chunk
set to BOS when the file asks for BOS) and scores only the second half of each chunk, so every
scored token sees at least ctx / 2 tokens of context. `ours` repeats exactly that over the engine's
scoring pass (LLM.perplexity scores a whole text in one pass instead), once on the dequantized fp32
weights (`--quantization none`) and once with the default settings (GGUF codes kept, int8
activations per 32-block, like llama.cpp's own dot products).

    python benchmarks/quality/perplexity.py [--llama-perplexity PATH] [--ctx 256] [--threads 2]

Writes results.json and prints a Markdown table. Models come from ../shared/models/fetch.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
FETCH = os.path.join(os.path.dirname(REPO), "shared", "models", "fetch.sh")
MODELS = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma-3-270m")
TEXTS = ("english.txt", "code.txt")
LLAMA_PERPLEXITY = os.path.expanduser("~/.cache/scalellm/peers/llamacpp/build/bin/llama-perplexity")


def chunked_perplexity(llm, text: str, ctx: int) -> tuple[float, int]:
    """(perplexity, scored tokens) over the second half of each ctx-token chunk, as llama-perplexity does."""
    tokenizer = llm.get_tokenizer()
    token_ids = tokenizer.encode(text)
    add_bos = bool(token_ids) and token_ids[0] == tokenizer.bos_token_id
    first = ctx // 2
    total, count = 0.0, 0
    for start in range(0, len(token_ids) // ctx * ctx, ctx):
        chunk = token_ids[start:start + ctx]
        if add_bos:
            chunk[0] = tokenizer.bos_token_id
        logprobs = llm.engine.core.executor.score(chunk)  # [ctx - 1]: log p(chunk[j] | chunk[:j]) at j - 1
        scored = logprobs[first:]  # tokens first + 1 .. ctx - 1
        total += float(scored.sum())
        count += scored.numel()
    return math.exp(-total / count), count


def llama_cpp_perplexity(binary: str, model: str, text_path: str, ctx: int, threads: int) -> float:
    out = subprocess.run([binary, "-m", model, "-f", text_path, "-c", str(ctx), "-b", str(ctx), "-t", str(threads)],
                         capture_output=True, text=True, timeout=1800)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if match is None:
        raise RuntimeError(f"llama-perplexity gave no estimate:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(match.group(1))


def main() -> None:
    from scalellm import LLM

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-perplexity", default=LLAMA_PERPLEXITY)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--output", default=os.path.join(HERE, "results.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        path = subprocess.run([FETCH, name], check=True, capture_output=True, text=True).stdout.strip()
        texts = {t: open(os.path.join(HERE, t), encoding="utf-8").read() for t in TEXTS}
        row = {"model": name, "ctx": args.ctx}
        for label, kwargs in (("ours_fp32", dict(dtype="float32", quantization="none")), ("ours_default", {})):
            llm = LLM(path, kv_cache_gib=0.25, max_model_len=4096, **kwargs)
            for text_name, text in texts.items():
                row[f"{label}_{text_name}"], row[f"tokens_{text_name}"] = chunked_perplexity(llm, text, args.ctx)
            del llm
        if os.path.isfile(args.llama_perplexity):
            for text_name in TEXTS:
                row[f"llamacpp_{text_name}"] = llama_cpp_perplexity(
                    args.llama_perplexity, path, os.path.join(HERE, text_name), args.ctx, args.threads)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| model | text | scored tokens | llama.cpp | ours, default | ours, fp32 | default vs llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for text in TEXTS:
            ours, theirs = row[f"ours_default_{text}"], row.get(f"llamacpp_{text}")
            ratio = f"{(ours / theirs - 1) * 100:+.2f}%" if theirs else "n/a"
            print(f"| {row['model']} | {text} | {row[f'tokens_{text}']} | {theirs or 'n/a'} | {ours:.4f} | "
                  f"{row[f'ours_fp32_{text}']:.4f} | {ratio} |")


if __name__ == "__main__":
    main()
