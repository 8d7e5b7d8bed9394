"""`scalellm replica`: flags, building the engine (real or mock) and running the gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys

from scalellm.config import DTYPES, EngineConfig
from scalellm.engine.client import EngineClient

ENGINES = ("real", "mock")
DEFAULT_PORT = 50051
MOCK_MAX_MODEL_LEN = 4096


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that shape the engine of a replica (shared by `scalellm replica` and `scalellm serve`)."""
    defaults = EngineConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("model", nargs="?", default=None,
                       help="Hugging Face directory or .gguf file (default: SmolLM2-135M-Instruct)")
    group.add_argument("--engine", choices=ENGINES, default="real",
                       help="real: the model; mock: synthetic tokens, to measure the serving path")
    group.add_argument("--tpot-ms", type=float, default=5.0, metavar="MS",
                       help="mock engine: ms per output token (default %(default)s)")
    group.add_argument("--ttft-ms", type=float, default=0.0, metavar="MS",
                       help="mock engine: ms before the first token (default %(default)s)")
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                       help="weights and activations (default %(default)s)")
    group.add_argument("--kv-cache-gib", type=float, default=defaults.kv_cache_gib, metavar="GIB",
                       help="memory for the KV cache (default %(default)s GiB)")
    group.add_argument("--max-model-len", type=int, default=None, metavar="N",
                       help="context length cap (default: the model's; mock: 4096)")
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs, metavar="N",
                       help="most requests in one batch (default %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                       metavar="N", help="token budget per engine step (default %(default)s)")
    group.add_argument("--num-threads", type=int, default=None, metavar="N",
                       help="torch threads (default: torch's)")
    group.add_argument("--quantization", choices=("none", "int8"), default="none",
                       help="weights: none (in --dtype) or int8 (W8A8 dynamic, per-token activations)")
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
                       metavar="N", help="processes per replica, the model split over them (default %(default)s)")
    group.add_argument("--enable-expert-parallel", action="store_true",
                       help="MoE models: spread whole experts over the tensor-parallel ranks")


def engine_argv(args: argparse.Namespace, num_threads: int | None = None) -> list[str]:
    """The `add_engine_args` flags of `args` as command-line arguments (for a replica subprocess)."""
    argv = [args.model] if args.model else []
    argv += ["--engine", args.engine, "--tpot-ms", str(args.tpot_ms), "--ttft-ms", str(args.ttft_ms),
             "--dtype", args.dtype, "--kv-cache-gib", str(args.kv_cache_gib),
             "--max-num-seqs", str(args.max_num_seqs),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens),
             "--quantization", args.quantization, "--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.enable_expert_parallel:
        argv.append("--enable-expert-parallel")
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    threads = num_threads if num_threads is not None else args.num_threads
    if threads is not None:
        argv += ["--num-threads", str(threads)]
    return argv


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """All flags of `scalellm replica`."""
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port (default %(default)s)")
    lending = parser.add_argument_group("core lending (set by `scalellm serve`; see engine/core_board.py)")
    lending.add_argument("--core-board", default=None, metavar="PATH",
                         help="the file through which this machine's replicas lend each other their cores")
    lending.add_argument("--core-board-slot", type=int, default=0, metavar="I", help="this replica's slot on it")
    lending.add_argument("--threads-when-alone", type=int, default=None, metavar="N",
                         help="threads for steps taken while every other replica is idle")


def build_engine(args: argparse.Namespace) -> EngineClient:
    """The engine the flags describe; the real one is imported only when asked for. ValueError on bad flags."""
    if args.engine == "mock":
        from scalellm.replica.mock_engine import MockEngine

        return MockEngine(args.model or "mock", tpot_ms=args.tpot_ms, ttft_ms=args.ttft_ms,
                          max_model_len=args.max_model_len or MOCK_MAX_MODEL_LEN,
                          max_num_seqs=args.max_num_seqs)
    from scalellm.engine.async_llm import AsyncLLM

    return AsyncLLM(EngineConfig(
        model=args.model, dtype=args.dtype, kv_cache_gib=args.kv_cache_gib,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.num_threads,
        quantization=args.quantization, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel, core_board=getattr(args, "core_board", None),
        core_board_slot=getattr(args, "core_board_slot", 0),
        threads_when_alone=getattr(args, "threads_when_alone", None)))


def run_replica(args: argparse.Namespace) -> None:
    """Serve one replica until SIGTERM/SIGINT (blocking), on uvloop."""
    import uvloop

    from scalellm.rpc.server import ListenError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = build_engine(args)
    try:
        failure = uvloop.run(_serve_until_signal_or_failure(engine, args))
    except ListenError as error:
        sys.exit(f"scalellm replica: error: {error}")
    if failure is not None:  # exit non-zero: a supervisor restarts the replica
        sys.exit(f"scalellm replica: error: the engine failed: {failure}")


async def _serve_until_signal_or_failure(engine: EngineClient, args: argparse.Namespace) -> BaseException | None:
    """Serve until SIGTERM/SIGINT (returns None), or until the real engine's loop dies (returns its error).

    A dead engine loop never recovers (and with tensor parallelism its ranks are gone), so the replica
    stops instead of staying up unhealthy.
    """
    from scalellm.rpc.server import serve_until_signal

    serving = asyncio.ensure_future(serve_until_signal(engine, args.host, args.port))
    if args.engine != "real":
        await serving
        return None
    failed = asyncio.ensure_future(engine.wait_failed())
    await asyncio.wait((serving, failed), return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        failed.cancel()
        serving.result()  # raises what serving raised
        return None
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    return failed.result()
