"""Tensor (and expert) parallelism against one rank: the offline engine (`LLM.generate`) at each layout.

Per layout it measures, after a warm-up, the median of --repeat runs of
  decode   one request, 16 prompt tokens, 128 output tokens      -> ms per output token
  batch    16 requests, 16 prompt tokens each, 64 output tokens  -> output tokens/s
  prefill  one 512-token prompt, one output token                -> ms
Every layout uses the machine's cores: --threads, else cores // ranks per rank.

Models: "default" (SmolLM2-135M-Instruct: 9 heads over 3 KV heads, split 6+3 / 2+1 on 2 ranks), or a
randomly initialised "llama-300m" (hidden 1024, 16 layers, 16 heads over 8 KV heads) or
"mixtral-400m" (hidden 1024, 8 layers, 8 experts of 2048, top-2), made once with transformers under
--workdir, or a Hugging Face directory.

    .venv/bin/python benchmarks/parallel/bench_tp.py --model default --layouts tp1,tp2
    .venv/bin/python benchmarks/parallel/bench_tp.py --model mixtral-400m --layouts tp1,tp2,ep2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from scalellm import LLM
from scalellm.protocol.types import SamplingParams

LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "ep2": (2, True), "tp4": (4, False)}
RANDOM_MODELS = {
    "llama-300m": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=8, tie_word_embeddings=True)),
    "mixtral-400m": ("MixtralConfig", "MixtralForCausalLM", dict(
        hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)),
}
VOCAB_SIZE = 49152


def random_model_dir(name: str, workdir: str) -> str:
    """A random model saved with the default model's tokenizer (made once, then reused)."""
    import transformers

    from scalellm.engine.loader import default_model_path

    directory = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    config_name, model_name, extra = RANDOM_MODELS[name]
    config = getattr(transformers, config_name)(vocab_size=VOCAB_SIZE, max_position_embeddings=2048,
                                                bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(0)
    getattr(transformers, model_name)(config).save_pretrained(directory, safe_serialization=True)
    gguf_dir, gguf_name = os.path.split(default_model_path())
    transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name).save_pretrained(directory)
    return directory


def timed(llm: LLM, prompts: list[list[int]], max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - start


def measure(llm: LLM, repeat: int) -> dict[str, float]:
    short = [[1000 + i] * 16 for i in range(16)]  # distinct prompts: no prefix-cache hits between requests
    timed(llm, short[:2], 8)  # warm-up (kernels, allocator)
    decode = statistics.median(timed(llm, [[2000 + r] * 16], 128) for r in range(repeat))
    batch = statistics.median(timed(llm, [[p[0] + 100 * r] * 16 for p in short], 64) for r in range(repeat))
    prefill = statistics.median(timed(llm, [[3000 + r] + list(range(4000, 4511))], 1) for r in range(repeat))
    return {"decode_ms_per_token": 1000 * decode / 128, "batch16_output_tokens_per_s": 16 * 64 / batch,
            "prefill512_ms": 1000 * prefill}


def run_layout(model: str | None, layout: str, args: argparse.Namespace) -> dict:
    ranks, expert_parallel = LAYOUTS[layout]
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // ranks)
    with LLM(model, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, num_threads=threads,
             tensor_parallel_size=ranks, enable_expert_parallel=expert_parallel) as llm:
        return {"layout": layout, "threads_per_rank": threads, **measure(llm, args.repeat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="default, llama-300m, mixtral-400m or a directory")
    parser.add_argument("--layouts", default="tp1,tp2", help=f"comma-separated of {', '.join(LAYOUTS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores // ranks)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/scalellm/bench-models"))
    parser.add_argument("--output", default=None, help="append the results as one JSON line to this file")
    args = parser.parse_args()
    model = None if args.model == "default" else (
        random_model_dir(args.model, args.workdir) if args.model in RANDOM_MODELS else args.model)
    print(f"| model | layout | threads/rank | decode ms/token | batch-16 output tok/s | prefill 512 ms |")
    print("|---|---|---:|---:|---:|---:|")
    for layout in args.layouts.split(","):
        result = {"model": args.model, "dtype": args.dtype, "device": "cuda" if torch.cuda.is_available() else "cpu",
                  **run_layout(model, layout, args)}
        print(f"| {args.model} | {layout} | {result['threads_per_rank']} | {result['decode_ms_per_token']:.1f} | "
              f"{result['batch16_output_tokens_per_s']:.1f} | {result['prefill512_ms']:.0f} |", flush=True)
        if args.output:
            with open(args.output, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
