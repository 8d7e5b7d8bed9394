"""`scalellm serve` flags: aliases, help text, and what is refused."""

import argparse

import pytest

from scalellm.cli import build_parser, main


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser("serve")
    [subparsers] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices["serve"]


@pytest.mark.parametrize("flag", ["--routing", "--routing-policy"])
def test_routing_flag_and_its_alias(flag):
    args = build_parser("serve").parse_args(["serve", flag, "round_robin"])
    assert args.routing_policy == "round_robin"


def test_unknown_routing_policy_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser("serve").parse_args(["serve", "--routing", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err


def test_every_serve_flag_has_a_one_line_help():
    actions = [a for a in serve_parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) > 20
    for action in actions:
        assert action.help and "\n" not in action.help, action.option_strings or action.dest
    text = serve_parser().format_help()
    for flag in ("--no-gateway", "--routing", "--replicas", "--engine", "--no-timings", "--api-key"):
        assert flag in text


def test_no_gateway_with_two_replicas_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--engine", "mock", "--no-gateway", "--replicas", "2"])
    assert exit_info.value.code == 2
    assert "use --replicas 1 (got 2)" in capsys.readouterr().err
