"""The --shape flags of `scalellm serve` and what they build: the controller's config and its advisor."""

from __future__ import annotations

import argparse
import logging

from scalellm.shape.controller import ControllerConfig, CoreRuleAdvisor, ProfileAdvisor, ShapeAdvisor
from scalellm.shape.shape import Machine

logger = logging.getLogger("scalellm.shape")


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The --shape flags of `scalellm serve`."""
    defaults = ControllerConfig()
    group = parser.add_argument_group("deployment shape")
    group.add_argument("--shape", default=None, metavar="SHAPE",
                       help="REPLICASxPARALLEL (e.g. 2x1: replicas x threads, or x tensor-parallel GPUs), "
                            "or auto: change with the load (default: --replicas)")
    group.add_argument("--profile", default=None, metavar="FILE",
                       help="--shape auto: the profile from `scalellm profile` (default: one replica per "
                            "request in flight)")
    group.add_argument("--shape-margin", type=float, default=defaults.margin, metavar="F",
                       help="--shape auto: predicted gain needed to change (default %(default)s)")
    group.add_argument("--shape-sustain", type=float, default=defaults.sustain_s, metavar="S",
                       help="--shape auto: seconds the gain must hold (default %(default)s)")
    group.add_argument("--shape-dwell", type=float, default=defaults.min_dwell_s, metavar="S",
                       help="--shape auto: least seconds between changes (default %(default)s)")
    group.add_argument("--shape-smoothing", type=float, default=defaults.smoothing_s, metavar="S",
                       help="--shape auto: time constant of the load average (default %(default)s)")
    group.add_argument("--shape-poll", type=float, default=1.0, metavar="S",
                       help="--shape auto: seconds between load polls (default %(default)s)")


def controller_config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """The ControllerConfig of the flags; ValueError on bad values."""
    return ControllerConfig(margin=args.shape_margin, sustain_s=args.shape_sustain,
                            min_dwell_s=args.shape_dwell, smoothing_s=args.shape_smoothing)


def build_advisor(args: argparse.Namespace, machine: Machine) -> ShapeAdvisor:
    """The profile's advisor with --profile, else the one-replica-per-request rule."""
    if args.profile is None:
        return CoreRuleAdvisor(machine)
    from scalellm.shape.profile import Profile

    profile = Profile.load(args.profile)
    if (profile.device, profile.num_units) != (machine.device, machine.num_units):
        logger.warning("the profile %s was measured on %d %s units, this machine has %d %s units",
                       args.profile, profile.num_units, profile.device, machine.num_units, machine.device)
    return ProfileAdvisor(profile, machine)
