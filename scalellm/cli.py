"""The `scalellm` command: serve | replica | gateway | bench | profile.

Each subcommand's flags come from the module that owns them, imported only when that subcommand
runs, so `scalellm replica` never loads the gateway and `scalellm gateway` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from scalellm import env


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    from scalellm.serve import add_serve_args

    add_serve_args(parser)


def _serve(args: argparse.Namespace) -> int:
    from scalellm.serve import run_serve

    return run_serve(args)


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
        from scalellm.process import die_with_parent

        die_with_parent()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        sys.exit(args.run(args))
    except ValueError as error:
        parser.exit(2, f"scalellm {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
