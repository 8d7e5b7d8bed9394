"""`scalellm serve`: one deployment path. Flags become a shape, a ReplicaLauncher and a Supervisor.

    --replicas N    the shape Nx(threads per replica): a fixed shape like any other
    --shape RxP     a fixed shape
    --shape auto    a starting shape, and an Autopilot that changes it with the load
    --no-gateway    no replicas at all: the HTTP API and the engine in one process

Whatever the shape, its replicas come from the launcher (scalellm/deploy/), which also sets up core
lending between the replicas of one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import secrets
import time

from scalellm.shape.shape import Machine, Shape

logger = logging.getLogger("scalellm.shape")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Every flag of `scalellm serve`: the engine's, the deployment's, the shape's and the gateway's."""
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
    parser.add_argument("--replica-host", default="127.0.0.1", metavar="HOST",
                        help="interface the replicas' gRPC servers listen on (default %(default)s: this machine "
                             "only); on any other they refuse every call without a secret made for this "
                             "deployment, which only the gateway is given")
    parser.add_argument("--launcher", choices=("local", "ray"), default="local",
                        help="where the replicas run: local (processes on this machine, the default) or ray "
                             "(Ray actors on the nodes of a Ray cluster; needs `pip install 'scalellm[ray]'`)")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="with --launcher ray: the cluster's GCS address (default: the cluster `ray start` "
                             "runs on this machine)")
    parser.add_argument("--no-lend-cores", action="store_false", dest="lend_cores",
                        help="keep each replica on its own thread share even while the others are idle "
                             "(default: a replica alone at work steps on every core)")
    add_shape_args(parser)
    add_gateway_args(parser)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code. ValueError for flags that do not fit together."""
    if args.replicas is not None and args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if getattr(args, "launcher", "local") == "ray" and args.no_gateway:
        raise ValueError("--no-gateway serves from this process alone: leave out --launcher ray")
    if args.no_gateway:
        return _serve_local(args)
    if args.shape is not None:
        return _serve_shape(args)
    return _serve_replicas(args)


def _serve_replicas(args: argparse.Namespace) -> int:
    """`--replicas N` (or the default count): the fixed shape N x threads-per-replica."""
    from scalellm.deploy.local import default_replica_count, threads_per_replica

    machine = deployment_machine(args)
    if _on_ray(args):  # one thread each unless told, as many replicas as the cluster's CPUs hold (up to 4)
        args.num_threads = args.num_threads or 1
        units = machine.num_units // (args.num_threads * args.tensor_parallel_size)
        args.replicas = args.replicas or max(1, min(4, units))
    if args.replicas is None:  # each replica runs tensor_parallel_size processes
        args.replicas = max(1, default_replica_count() // args.tensor_parallel_size)
    num_threads = args.num_threads or threads_per_replica(args.replicas * args.tensor_parallel_size)
    parallel = args.tensor_parallel_size if machine.device == "cuda" else num_threads
    shape = Shape(args.replicas, parallel)
    if machine.device == "cuda" and not machine.fits(shape):
        raise ValueError(f"{args.replicas} replicas of {parallel} GPUs need {shape.num_units} GPUs, this machine "
                         f"has {machine.num_units}: lower --replicas or --tensor-parallel-size")
    return _supervise(args, machine, shape, num_threads)


def _serve_shape(args: argparse.Namespace) -> int:
    """`--shape auto|RxP`: the replicas of one shape, and with auto the autopilot changing it."""
    from scalellm.shape.cli import build_advisor

    if args.replicas is not None or args.num_threads is not None or getattr(args, "tensor_parallel_size", 1) != 1:
        raise ValueError("--shape sets the replicas and their parallelism (threads on a CPU, tensor-parallel "
                         "GPUs): leave out --replicas, --num-threads and --tensor-parallel-size")
    if args.shape_poll <= 0:
        raise ValueError(f"--shape-poll must be > 0, got {args.shape_poll}")
    auto = args.shape == "auto"
    if args.profile is not None and not auto:
        raise ValueError("--profile goes with --shape auto")
    machine = deployment_machine(args)
    if auto and _on_ray(args):  # a change places the new set before the old one drains: half is headroom
        machine = dataclasses.replace(machine, num_units=max(1, machine.num_units // 2))
        logger.info("shape auto on Ray: shapes of %d %s units, half the cluster's, so that a change fits "
                    "beside the set it replaces", machine.num_units, machine.device)
    advisor = build_advisor(args, machine) if auto else None
    try:
        shape = advisor.initial_shape() if advisor else Shape.parse(args.shape)
    except ValueError:
        raise ValueError(f"--shape takes auto or REPLICASxPARALLEL such as 2x1, got {args.shape!r}") from None
    return _supervise(args, machine, shape, None, advisor)


def _supervise(args: argparse.Namespace, machine: Machine, shape: Shape, num_threads: int | None,
               advisor=None) -> int:
    """Run the supervisor over a local launcher's replica set of `shape` (and the autopilot, with an advisor)."""
    from scalellm.gateway.app import ssl_context
    from scalellm.gateway.cli_args import gateway_config_from_args
    from scalellm.supervisor import Supervisor

    launcher = ray_launcher(args, machine, num_threads, shape) if _on_ray(args) else \
        local_launcher(args, machine, num_threads)
    config = gateway_config_from_args(args, ())
    ssl_context(config)  # a certificate that does not load fails here, before any replica starts
    supervisor = Supervisor(launcher, shape, config, startup_timeout_s=args.startup_timeout)
    if advisor is not None:
        supervisor.autopilot = _autopilot(args, advisor, launcher, supervisor, shape)
    return supervisor.run()


def local_launcher(args: argparse.Namespace, machine: Machine, num_threads: int | None):
    """The LocalLauncher of the serve flags: the engine flags' ReplicaConfig for every replica, on
    --replica-host (beyond loopback with a new secret); the replicas lend each other cores unless
    --no-lend-cores."""
    from scalellm.deploy.local import LocalLauncher
    from scalellm.replica.launch import replica_config_from_args, with_threads

    replica = with_threads(replica_config_from_args(args), num_threads)
    host = getattr(args, "replica_host", "127.0.0.1")
    if not is_loopback(host):
        replica = dataclasses.replace(replica, secret=secrets.token_urlsafe(32))
    return LocalLauncher(replica, machine, host, lend_cores=args.lend_cores)


def _on_ray(args: argparse.Namespace) -> bool:
    return getattr(args, "launcher", "local") == "ray"


def deployment_machine(args: argparse.Namespace) -> Machine:
    """What shapes are cut from: this machine, or with --launcher ray the cluster joined now (its CPUs,
    or its GPUs). ValueError naming what to do when ray is missing or the cluster cannot be reached."""
    if not _on_ray(args):
        return Machine.detect()
    from scalellm.deploy.ray import RayLauncher

    return RayLauncher.connect(args.ray_address)


def ray_launcher(args: argparse.Namespace, machine: Machine, num_threads: int | None, shape: Shape):
    """The RayLauncher of the serve flags (replicas on node addresses, always with a new secret);
    ValueError when the cluster's free CPUs cannot hold `shape` now."""
    from scalellm.deploy.ray import RayLauncher
    from scalellm.replica.launch import replica_config_from_args, with_threads

    if getattr(args, "replica_host", "127.0.0.1") != "127.0.0.1":
        raise ValueError("--replica-host is for local replicas: on Ray each listens on its node's address")
    replica = dataclasses.replace(with_threads(replica_config_from_args(args), num_threads),
                                  secret=secrets.token_urlsafe(32))
    launcher = RayLauncher(replica, machine, listen_timeout_s=args.startup_timeout)
    launcher.check_fits(shape)
    return launcher


def is_loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _autopilot(args: argparse.Namespace, advisor, launcher, supervisor, shape: Shape):
    from scalellm.deploy.autopilot import Autopilot
    from scalellm.shape.cli import controller_config_from_args
    from scalellm.shape.controller import ShapeController

    logger.info("shape auto over %s (%s), starting with %s", ", ".join(s.label for s in advisor.shapes),
                f"profile {args.profile}" if args.profile else "rule: one replica per request in flight",
                shape.label)
    controller = ShapeController(advisor, controller_config_from_args(args), shape, time.monotonic())
    return Autopilot(controller, launcher, supervisor, poll_interval_s=args.shape_poll,
                     startup_timeout_s=args.startup_timeout,
                     drain_timeout_s=supervisor.gateway_config.request_timeout_s + 5.0)


def _serve_local(args: argparse.Namespace) -> int:
    """`serve --no-gateway`: the gateway's HTTP app and the engine in this one process."""
    from scalellm.deploy.local import threads_per_replica
    from scalellm.gateway.cli_args import gateway_config_from_args
    from scalellm.gateway.local_replica import run_local_server
    from scalellm.process import StartupError, check_port_free
    from scalellm.replica.launch import build_engine, replica_config_from_args, with_threads

    if args.replicas not in (None, 1):
        raise ValueError(f"--no-gateway serves one in-process engine: use --replicas 1 (got {args.replicas})")
    config = gateway_config_from_args(args, ())
    try:
        check_port_free(config.host, config.port)
    except StartupError as error:
        raise ValueError(str(error)) from None
    replica = replica_config_from_args(args)
    num_threads = replica.engine.num_threads or threads_per_replica(replica.engine.tensor_parallel_size)
    engine = build_engine(with_threads(replica, num_threads))

    def banner(app) -> None:
        print(f"ScaleLLM serving {engine.model_name} at {config.scheme}://{config.host}:{app.port} "
              "(one process: engine in-process, no gRPC hop)", flush=True)

    run_local_server(engine, config, banner)
    return 0
