"""The `scalellm` command: serve | replica | gateway | bench | profile.

Each subcommand's flags come from the module that owns them, imported only when that subcommand
runs, so `scalellm replica` never loads the gateway and `scalellm gateway` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import Callable

from scalellm import env


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.gateway.cli_args import add_gateway_args
    from scalellm.replica.launch import add_engine_args
    from scalellm.shape.cli import add_shape_args

    add_engine_args(parser)
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="replica processes (default: one per CPU core up to 4, one with a GPU)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, metavar="S",
                        help="seconds a replica may take to load its model (default %(default)s)")
    parser.add_argument("--no-gateway", action="store_true",
                        help="serve the HTTP API from one process holding the engine (no gRPC; --replicas 1)")
    parser.add_argument("--no-lend-cores", action="store_false", dest="lend_cores",
                        help="keep each replica on its own thread share even while the others are idle "
                             "(default: a replica alone at work steps on every core)")
    add_shape_args(parser)
    add_gateway_args(parser)


def _serve(args: argparse.Namespace) -> int:
    from scalellm.gateway.cli_args import gateway_config_from_args
    from scalellm.replica.launch import engine_argv
    from scalellm.shape.shape import Shape
    from scalellm.supervisor import Supervisor, default_replica_count, free_ports, threads_per_replica

    if args.replicas is not None and args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if args.no_gateway:
        return _serve_local(args)
    if args.shape is not None:
        from scalellm.shape.cli import serve_with_shape

        return serve_with_shape(args)
    if args.replicas is None:  # each replica runs tensor_parallel_size processes
        args.replicas = max(1, default_replica_count() // args.tensor_parallel_size)
    num_threads = args.num_threads or threads_per_replica(args.replicas * args.tensor_parallel_size)
    addresses = [f"127.0.0.1:{port}" for port in free_ports(args.replicas)]
    argvs = [[sys.executable, "-m", "scalellm.cli", "replica", *engine_argv(args, num_threads),
              "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]] for address in addresses]
    config = gateway_config_from_args(args, addresses)
    board = _core_board(args, argvs, num_threads)
    try:
        return Supervisor(argvs, addresses, config, startup_timeout_s=args.startup_timeout,
                          shape=Shape(args.replicas, num_threads)).run()
    finally:
        if board is not None:
            os.unlink(board)


def _core_board(args: argparse.Namespace, argvs: list[list[str]], num_threads: int) -> str | None:
    """With several single-rank replicas on a CPU: create the board through which they lend each
    other their cores (engine/core_board.py) and add its flags to each replica's argv."""
    from scalellm.engine.core_board import create_board

    cores = len(os.sched_getaffinity(0))
    if not args.lend_cores or len(argvs) < 2 or args.tensor_parallel_size != 1 or args.engine != "real" \
            or cores <= num_threads:
        return None
    fd, board = tempfile.mkstemp(prefix="scalellm-cores-")
    os.close(fd)
    create_board(board, len(argvs))
    for slot, argv in enumerate(argvs):
        argv += ["--core-board", board, "--core-board-slot", str(slot), "--threads-when-alone", str(cores)]
    return board


def _serve_local(args: argparse.Namespace) -> int:
    """`serve --no-gateway`: the gateway's HTTP app and the engine in this one process."""
    from scalellm.gateway.cli_args import gateway_config_from_args
    from scalellm.gateway.local_replica import run_local_server
    from scalellm.replica.launch import build_engine
    from scalellm.supervisor import StartupError, check_port_free, threads_per_replica

    if args.replicas not in (None, 1):
        raise ValueError(f"--no-gateway serves one in-process engine: use --replicas 1 (got {args.replicas})")
    config = gateway_config_from_args(args, ())
    try:
        check_port_free(config.host, config.port)
    except StartupError as error:
        raise ValueError(str(error)) from None
    engine = build_engine(argparse.Namespace(**{**vars(args), "num_threads": args.num_threads
                                                or threads_per_replica(args.tensor_parallel_size)}))

    def banner(app) -> None:
        print(f"ScaleLLM serving {engine.model_name} at http://{config.host}:{app.port} "
              "(one process: engine in-process, no gRPC hop)", flush=True)

    run_local_server(engine, config, banner)
    return 0


def _add_replica_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.replica.launch import add_replica_args

    add_replica_args(parser)


def _replica(args: argparse.Namespace) -> int:
    from scalellm.replica.launch import run_replica

    run_replica(args)
    return 0


def _add_gateway_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.gateway.cli_args import add_gateway_args

    parser.add_argument("--replica", action="append", required=True, metavar="HOST:PORT",
                        help="a replica's gRPC address (repeat for each replica)")
    add_gateway_args(parser)


def _gateway(args: argparse.Namespace) -> int:
    from scalellm.gateway.app import run_gateway
    from scalellm.gateway.cli_args import gateway_config_from_args

    run_gateway(gateway_config_from_args(args, args.replica))
    return 0


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.bench.cli import add_bench_args

    add_bench_args(parser)


def _bench(args: argparse.Namespace) -> int:
    from scalellm.bench.cli import run_bench

    result = run_bench(args)
    return result if isinstance(result, int) else 0


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.shape.profiling import add_profile_args

    add_profile_args(parser)


def _profile(args: argparse.Namespace) -> int:
    from scalellm.shape.profiling import run_profile

    return run_profile(args)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "serve": ("run a gateway and N replicas on this machine (or one process: --no-gateway)",
              _add_serve_args, _serve),
    "replica": ("run one replica (gRPC server over an engine)", _add_replica_args, _replica),
    "gateway": ("run the OpenAI-compatible gateway alone", _add_gateway_args, _gateway),
    "bench": ("benchmark a running server", _add_bench_args, _bench),
    "profile": ("measure each deployment shape (replicas x parallelism) for serve --shape auto",
                _add_profile_args, _profile),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only `command`'s flags are added (and only its modules imported)."""
    parser = argparse.ArgumentParser(prog="scalellm", description="ScaleLLM: serve LLMs over an OpenAI API.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(run=run)
        if name == command:
            add_args(subparser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `scalellm` console script."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if env.parent_pid() is not None:
        from scalellm.supervisor import die_with_parent

        die_with_parent()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sys.exit(args.run(args))
    except ValueError as error:
        parser.exit(2, f"scalellm {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
