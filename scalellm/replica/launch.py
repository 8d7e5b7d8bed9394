"""`scalellm replica`: its flags (generated from the config dataclasses), building the engine (over the
model, or over a fake model: the mock engine) and running the gRPC server.

A replica's whole configuration is a `ReplicaConfig` (replica/config.py). By hand it comes from flags;
`scalellm serve` gives it as JSON on stdin (`--config-stdin`), the one way its replicas get theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys

from scalellm.config import ATTENTION_BACKENDS, DTYPES, KV_CACHE_DTYPES, EngineConfig
from scalellm.engine.client import EngineClient
from scalellm.flags import add_config_flags, config_from_flags, from_json, to_flags
from scalellm.replica.config import MockEngineConfig, ReplicaConfig

ENGINES = ("real", "mock")
LENDING_FIELDS = ("core_board", "core_board_slot", "threads_when_alone")
"""EngineConfig fields set only by the launcher of a machine's replicas (scalellm/deploy/local.py)."""
ENGINE_FLAGS = {
    "exclude": LENDING_FIELDS,
    "positional": ("model",),
    "aliases": {"tensor_parallel_size": ("-tp",)},
    "choices": {"dtype": DTYPES, "attention_backend": ATTENTION_BACKENDS, "kv_cache_dtype": KV_CACHE_DTYPES},
}
"""How EngineConfig's fields become flags (scalellm/flags.py)."""


def add_engine_args(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The engine's flags, one per EngineConfig field (shared by `replica`, `serve` and `profile`;
    `exclude` leaves out fields whose flag name the command uses otherwise)."""
    group = parser.add_argument_group("engine")
    add_config_flags(group, EngineConfig, **{**ENGINE_FLAGS, "exclude": (*LENDING_FIELDS, *exclude)})
    group.add_argument("--engine", choices=ENGINES, default="real",
                       help="real: the model; mock: synthetic tokens, to measure the serving path")
    add_config_flags(group, MockEngineConfig)


def replica_config_from_args(args: argparse.Namespace, **overrides) -> ReplicaConfig:
    """The ReplicaConfig of the engine flags (`overrides`: other ReplicaConfig fields). ValueError on bad values."""
    engine = config_from_flags(EngineConfig, args)
    mock = config_from_flags(MockEngineConfig, args) if args.engine == "mock" else None
    overrides.setdefault("otlp_traces_endpoint", getattr(args, "otlp_traces_endpoint", None))
    return ReplicaConfig(engine=engine, mock=mock, **overrides)


def engine_flags(config: ReplicaConfig) -> list[str]:
    """The engine flags that `add_engine_args` parses back into `config`'s engine (defaults left out)."""
    argv = to_flags(config.engine, **ENGINE_FLAGS)
    if config.mock is not None:
        argv += ["--engine", "mock", *to_flags(config.mock)]
    return argv


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """All flags of `scalellm replica`."""
    add_engine_args(parser)
    server = parser.add_argument_group("server")
    add_config_flags(server, ReplicaConfig, exclude=("engine", "mock", "secret"))
    server.add_argument("--config-stdin", action="store_true",
                        help="read the whole ReplicaConfig as one line of JSON from stdin, as `scalellm serve` "
                             "gives it; the other flags are then ignored")


def replica_config(args: argparse.Namespace) -> ReplicaConfig:
    """The ReplicaConfig of `scalellm replica`'s flags, or of stdin with --config-stdin."""
    if args.config_stdin:
        return from_json(ReplicaConfig, sys.stdin.readline())
    return replica_config_from_args(args, host=args.host, port=args.port)


def build_engine(config: ReplicaConfig) -> EngineClient:
    """The engine `config` describes; the real one is imported only when asked for."""
    engine = config.engine
    if config.mock is not None:
        from scalellm.replica.mock_engine import MockEngine

        fields = {name: value for name, value in dataclasses.asdict(engine).items()
                  if name not in ("model", "max_model_len", "max_num_seqs", "enable_prefix_caching")}
        return MockEngine(engine.model or "mock", tpot_ms=config.mock.tpot_ms, ttft_ms=config.mock.ttft_ms,
                          max_model_len=engine.max_model_len, max_num_seqs=engine.max_num_seqs, **fields)
    from scalellm.engine.async_llm import AsyncLLM

    return AsyncLLM(engine)


def with_threads(config: ReplicaConfig, num_threads: int | None) -> ReplicaConfig:
    """`config` with its engine on `num_threads` intra-op threads (unchanged for None)."""
    if num_threads is None:
        return config
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, num_threads=num_threads))


def run_replica(args: argparse.Namespace) -> None:
    """Serve one replica until SIGTERM/SIGINT (blocking), on uvloop."""
    import uvloop

    from scalellm.rpc.server import ListenError

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = replica_config(args)
    engine = build_engine(config)
    try:
        failure = uvloop.run(_serve_until_signal_or_failure(engine, config))
    except ListenError as error:
        sys.exit(f"scalellm replica: error: {error}")
    if failure is not None:  # exit non-zero: a supervisor restarts the replica
        sys.exit(f"scalellm replica: error: the engine failed: {failure}")


async def _serve_until_signal_or_failure(engine: EngineClient, config: ReplicaConfig) -> BaseException | None:
    """Serve until SIGTERM/SIGINT (returns None), or until the real engine's loop dies (returns its error).

    A dead engine loop never recovers (and with tensor parallelism its ranks are gone), so the replica
    stops instead of staying up unhealthy.
    """
    from scalellm.process import freeze_loaded_objects
    from scalellm.rpc.server import serve_until_signal

    from scalellm.tracing import start_tracing, tracing_config

    tracing = start_tracing(tracing_config(config.otlp_traces_endpoint, "scalellm-replica"))
    serving = asyncio.ensure_future(serve_until_signal(engine, config.host, config.port, secret=config.secret,
                                                       tracing=tracing, on_engine_started=freeze_loaded_objects))
    if config.mock is not None:
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
