"""`scalellm serve --shape ...` (fixed or automatic shapes) and the flags of the shape controller."""

from __future__ import annotations

import argparse
import logging
import time

from scalellm.shape.controller import ControllerConfig, CoreRuleAdvisor, ProfileAdvisor, ShapeAdvisor
from scalellm.shape.shape import Machine, Shape

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


def serve_with_shape(args: argparse.Namespace) -> int:
    """`serve --shape auto|RxP`: the replicas of one shape, and with auto the autopilot changing it."""
    from scalellm.gateway.cli_args import gateway_config_from_args
    from scalellm.replica.launch import engine_argv
    from scalellm.shape.autopilot import Autopilot
    from scalellm.shape.controller import ShapeController
    from scalellm.shape.deployment import ReplicaLauncher
    from scalellm.supervisor import Supervisor

    if args.replicas is not None or args.num_threads is not None or getattr(args, "tensor_parallel_size", 1) != 1:
        raise ValueError("--shape sets the replicas and their parallelism (threads on a CPU, tensor-parallel "
                         "GPUs): leave out --replicas, --num-threads and --tensor-parallel-size")
    if args.shape_poll <= 0:
        raise ValueError(f"--shape-poll must be > 0, got {args.shape_poll}")
    auto = args.shape == "auto"
    if args.profile is not None and not auto:
        raise ValueError("--profile goes with --shape auto")
    machine = Machine.detect()
    controller_config = controller_config_from_args(args)
    advisor = build_advisor(args, machine) if auto else None
    try:
        shape = advisor.initial_shape() if advisor else Shape.parse(args.shape)
    except ValueError:
        raise ValueError(f"--shape takes auto or REPLICASxPARALLEL such as 2x1, got {args.shape!r}") from None
    launcher = ReplicaLauncher(engine_argv(args), machine)
    replica_set = launcher.build(shape)
    config = gateway_config_from_args(args, replica_set.addresses)
    supervisor = Supervisor([], [], config, startup_timeout_s=args.startup_timeout, replica_set=replica_set)
    if advisor is not None:
        logger.info("shape auto over %s (%s), starting with %s", ", ".join(s.label for s in advisor.shapes),
                    f"profile {args.profile}" if args.profile else "rule: one replica per request in flight",
                    shape.label)
        controller = ShapeController(advisor, controller_config, shape, time.monotonic())
        supervisor.autopilot = Autopilot(controller, launcher, supervisor, poll_interval_s=args.shape_poll,
                                         startup_timeout_s=args.startup_timeout,
                                         drain_timeout_s=config.request_timeout_s + 5.0)
    return supervisor.run()
