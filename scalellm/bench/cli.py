"""``scalellm bench``: measure any OpenAI endpoint, or several systems side by side.

    scalellm bench --url http://127.0.0.1:8000 --concurrency 1,16,64
    scalellm bench --compare --systems scalellm,vllm,llamacpp --repeat 3 --output benchmarks/
    scalellm bench --machine          # this machine's bandwidth and matmul peaks, for the roofline

``add_bench_args`` fills a parser (the top-level CLI mounts it as a
subcommand); ``run_bench`` runs the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
from pathlib import Path

from scalellm.bench import compare, machine, peer_install, peers, procstat, roofline, structured
from scalellm.bench.client import ClientConfig, normalize_base_url
from scalellm.bench.metrics import parse_slos
from scalellm.bench.modelinfo import discover_model
from scalellm.bench.progress import ProgressLine
from scalellm.bench.report import results_table, write_report
from scalellm.bench.runner import BenchPlan, results_document, run_plan
from scalellm.bench.steps import parse_load_steps


def concurrency_list(text: str) -> tuple[int, ...]:
    """argparse type: ``"1,16,64"`` -> (1, 16, 64)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,16,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be positive integers, got {text!r}")
    return values


def request_rate(text: str) -> float:
    """argparse type: a positive number of requests per second, or ``inf``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or 'inf', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the request rate must be > 0, got {text!r}")
    return value


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Add every ``scalellm bench`` option to ``parser``."""
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", help="model name to send (default: the first id of GET /v1/models)")
    target.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    target.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--no-keepalive", action="store_true",
                        help="open a fresh connection per request (llama.cpp's server needs it)")
    target.add_argument("--server-pids", type=int, nargs="+", default=[], metavar="PID",
                        help="server processes whose CPU (with all descendants) is measured from /proc")
    target.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    target.add_argument("--label", default="server", help="name of the measured system in the report")

    load = parser.add_argument_group("workload")
    load.add_argument("--concurrency", type=concurrency_list, default=(1, 16, 64),
                      help="requests in flight, comma-separated (default 1,16,64)")
    load.add_argument("--requests", type=int, help="measured requests per point (default max(16, 4*C))")
    load.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                      help="stream the responses (default) or not")
    load.add_argument("--dataset", default="random", help="'random' (default) or a JSONL file of requests")
    load.add_argument("--input-len", type=int, default=48, help="words per random prompt (default 48)")
    load.add_argument("--output-len", type=int, default=64, help="max_tokens (default 64)")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="ask the server to ignore EOS so every request yields --output-len tokens")
    load.add_argument("--request-rate", type=request_rate, default=math.inf,
                      help="Poisson arrivals per second; inf (default) = closed loop")
    load.add_argument("--load-steps", type=parse_load_steps, default=None, metavar="C:S,...",
                      help="a closed loop whose concurrency steps over time, e.g. 1:60,64:120,1:60 "
                           "(concurrency:seconds); replaces --concurrency")
    load.add_argument("--settle", type=float, default=0.0, metavar="S",
                      help="--load-steps: also summarize each step without its first S seconds")
    load.add_argument("--slo", help="goodput SLOs in seconds, e.g. ttft=0.5,tpot=0.05,e2el=10")
    load.add_argument("--repeat", type=int, help="runs per point (default 1; 3 with --compare)")
    load.add_argument("--warmup", type=int, default=2, help="warm-up requests before each point (default 2)")
    load.add_argument("--seed", type=int, default=0, help="seed of the random prompts and arrivals")
    load.add_argument("--response-format", choices=structured.RESPONSE_FORMATS, default="text",
                      help="structured workload: json_object, or json_schema with --schema FILE")
    load.add_argument("--schema", type=Path, help="JSON Schema file for --response-format json_schema")
    load.add_argument("--tools", type=Path, help="JSON file of OpenAI tools (a list, or {tools, tool_choice})")
    parser.add_argument("--output", type=Path, default=Path("bench-results"),
                        help="folder for results.json, results.md and plots (default bench-results/)")
    _add_compare_args(parser)
    _add_roofline_args(parser)


def _add_roofline_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("machine limits and roofline")
    group.add_argument("--machine", action="store_true",
                       help="probe this machine (memory bandwidth, matmul peaks), write it to --machine-file "
                            "and OUTPUT/machine.json, then exit")
    group.add_argument("--machine-file", type=Path, default=None,
                       help=f"the probe the roofline divides by (default {machine.default_probe_path()})")
    group.add_argument("--weights", action="append", metavar="SYSTEM=FORMAT",
                       help=f"the weight format a system serves ({', '.join(roofline.WEIGHT_KINDS)}) for the "
                            "roofline; default: reported by the server, else inferred (recorded in results)")


def _add_compare_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compare mode")
    group.add_argument("--compare", action="store_true", help="start and measure several systems in turn")
    group.add_argument("--systems", default="scalellm,vllm,llamacpp",
                       help=f"comma-separated, from {','.join(peers.SYSTEMS)} or --system-cmd names")
    group.add_argument("--system-cmd", action="append", metavar="NAME=COMMAND",
                       help="start command of a system, with {port} (also {gguf} {scalellm} {python}); "
                            "overrides a built-in one or defines a new one")
    group.add_argument("--baseline", default="scalellm", help="system the ratios are taken against")
    group.add_argument("--peers-cache", type=Path, default=None,
                       help="where peers are installed (default ~/.cache/scalellm/peers)")
    group.add_argument("--gguf", type=Path, help="GGUF the peers serve (default: the default model's)")
    group.add_argument("--build-jobs", type=int, default=1, help="parallel jobs for building llama.cpp")
    group.add_argument("--install-peers", action="store_true",
                       help="only install/build the --systems peers, then exit")
    group.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                       help="longest request every system must accept (long-prompt workloads)")
    group.add_argument("--allow-other-servers", action="store_true",
                       help="start a system even while other servers are alive (recorded in results)")
    group.add_argument("--verify-peer", action="store_true",
                       help="also run vLLM's own `vllm bench serve` on the same prompts against the same "
                            "server and report both")


def run_bench(args: argparse.Namespace) -> int:
    """Run ``scalellm bench``; 0 on success, 1 when the run failed, 2 for bad input."""
    try:
        if args.install_peers:
            return _install_peers(args)
        if args.machine:
            return _probe_machine(args)
        return _run_compare(args) if args.compare else _run_single(args)
    except ValueError as error:
        print(f"scalellm bench: error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as error:
        print(f"scalellm bench: failed: {error}", file=sys.stderr)
        return 1


def build_plan(args: argparse.Namespace, default_repeat: int) -> BenchPlan:
    if args.dataset != "random" and not Path(args.dataset).is_file():
        raise ValueError(f"--dataset {args.dataset!r} is neither 'random' nor an existing JSONL file")
    if args.max_model_len is not None and args.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {args.max_model_len}")
    return BenchPlan(concurrencies=tuple(args.concurrency), num_requests=args.requests,
                     repeats=args.repeat or default_repeat, num_warmup=args.warmup,
                     request_rate=args.request_rate, dataset=args.dataset, input_len=args.input_len,
                     output_len=args.output_len, seed=args.seed, slos=parse_slos(args.slo))


def build_client(args: argparse.Namespace, base_url: str, model: str) -> ClientConfig:
    roofline.parse_weight_kinds(args.weights)  # a bad --weights fails before anything is measured
    extra = structured.request_fields(args.response_format, args.schema, args.tools)
    if extra and args.endpoint != "chat":
        raise ValueError("--response-format and --tools apply to the chat endpoint")
    return ClientConfig(base_url=base_url, model=model, endpoint=args.endpoint, stream=args.stream,
                        ignore_eos=args.ignore_eos, api_key=args.api_key,
                        keepalive=not args.no_keepalive, timeout_s=args.timeout, extra_fields=extra)


def describe_config(args: argparse.Namespace, plan: BenchPlan) -> dict:
    """The resolved settings, recorded in results.json."""
    mode = "closed loop" if math.isinf(plan.request_rate) else f"Poisson {plan.request_rate}/s"
    prompts = (f"{plan.input_len} random words (seed {plan.seed})" if plan.dataset == "random"
               else f"dataset {plan.dataset}")
    workload = (f"{args.endpoint}, {prompts}, max_tokens {plan.output_len}, ignore_eos {args.ignore_eos}, "
                f"temperature 0, {'streamed' if args.stream else 'not streamed'}, {mode}, "
                f"N = {plan.num_requests or 'max(16, 4C)'} after {plan.num_warmup} warm-up, "
                f"{plan.repeats} repeat(s)")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k != "api_key" and not callable(v)}
    settings["request_rate"] = "inf" if math.isinf(plan.request_rate) else plan.request_rate
    return {"workload": workload, "argv": sys.argv, **settings}


def _run_single(args: argparse.Namespace) -> int:
    if not args.url:
        raise ValueError("--url is required (or use --compare to start systems)")
    base_url = normalize_base_url(args.url)
    plan = build_plan(args, default_repeat=1)
    pids = procstat.check_pids(args.server_pids)
    model = args.model or discover_model(base_url, args.api_key)
    client = build_client(args, base_url, model)
    if args.load_steps:
        from scalellm.bench.steps_cli import finish_steps, measure_steps

        systems = {args.label: {"url": base_url, "model": model, "server_pids": pids}}
        results = measure_steps(args, plan)(args.label, client, pids)
        return finish_steps(args, plan, systems, results)
    points = run_plan(args.label, client, plan, pids, ProgressLine(0))
    systems = {args.label: {"url": base_url, "model": model, "server_pids": pids}}
    document_roofline = _roofline(args, points, systems, single=True)
    document = results_document(describe_config(args, plan), systems, points)
    document["roofline"] = document_roofline
    return _finish(args, document)


def _run_compare(args: argparse.Namespace) -> int:
    """Compare mode; SIGTERM unwinds like Ctrl-C, so the running system stops with all it started."""
    if threading.current_thread() is not threading.main_thread():
        return _compare(args)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _compare(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _compare(args: argparse.Namespace) -> int:
    plan = build_plan(args, default_repeat=3)
    custom = peers.parse_system_commands(args.system_cmd)
    names = compare.check_systems([s.strip() for s in args.systems.split(",") if s.strip()], custom)
    client = build_client(args, base_url="http://127.0.0.1", model=args.model or "")
    if args.load_steps:
        from scalellm.bench.steps_cli import finish_steps, measure_steps

        systems, results = compare.run_compare(names, custom, _peer_options(args), client, plan, args.output,
                                               measure=measure_steps(args, plan))
        return finish_steps(args, plan, systems, results)
    systems, points = compare.run_compare(names, custom, _peer_options(args), client, plan,
                                          args.output, ProgressLine(0), allow_other_servers=args.allow_other_servers,
                                          verify_peer=args.verify_peer)
    document_roofline = _roofline(args, points, systems, single=False)
    document = results_document(describe_config(args, plan), systems, points)
    document["roofline"] = document_roofline
    document["ratios"] = compare.compute_ratios(document["aggregates"], args.baseline)
    return _finish(args, document)


def _install_peers(args: argparse.Namespace) -> int:
    options = _peer_options(args)
    custom = peers.parse_system_commands(args.system_cmd)
    for name in compare.check_systems([s.strip() for s in args.systems.split(",") if s.strip()], custom):
        spec = peers.prepare_system(name, options, custom)
        print(f"{name}: {spec.command}")
    return 0


def _peer_options(args: argparse.Namespace) -> peers.PeerOptions:
    if args.build_jobs < 1:
        raise ValueError(f"--build-jobs must be >= 1, got {args.build_jobs}")
    gguf = args.gguf or peer_install.default_gguf_path()
    if not gguf.is_file():
        raise ValueError(f"--gguf {gguf} is not a file")
    return peers.PeerOptions(cache_dir=args.peers_cache or peer_install.default_cache_dir(),
                             gguf=gguf.resolve(), build_jobs=args.build_jobs, max_model_len=args.max_model_len)


def _probe_machine(args: argparse.Namespace) -> int:
    print("probing memory bandwidth and matmul peaks (about a minute)...", file=sys.stderr, flush=True)
    probe = machine.probe_machine()
    path = args.machine_file or machine.default_probe_path()
    for target in (path, args.output / "machine.json"):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(probe, indent=2) + "\n")
    print(machine.describe(probe))
    print(f"\nwrote {path} and {args.output / 'machine.json'}")
    return 0


def _roofline(args: argparse.Namespace, points: list, systems: dict, single: bool) -> dict:
    """Roofline figures into every point's summary (see roofline.py); the assumptions made.
    Never fails the run it reports on: a problem becomes the reason it was skipped."""
    try:
        return _apply_roofline(args, points, systems, single)
    except (ValueError, OSError, KeyError, IndexError) as error:
        return {"skipped": f"{type(error).__name__}: {error}"}


def _apply_roofline(args: argparse.Namespace, points: list, systems: dict, single: bool) -> dict:
    gguf = args.gguf
    if gguf is None and not single:
        gguf = peer_install.default_gguf_path()
    if gguf is None:
        return {"skipped": "pass --gguf (the served model's file) and --weights LABEL=FORMAT for the roofline"}
    overrides = roofline.parse_weight_kinds(args.weights)
    if single and args.label not in overrides and not systems[args.label].get("weight_format"):
        return {"skipped": f"pass --weights {args.label}=FORMAT: a server at --url may serve any format"}
    path = args.machine_file or machine.default_probe_path()
    probe = machine.load_probe(path) if path.exists() else None
    facts = roofline.ModelFacts.from_gguf(gguf)
    assumptions = roofline.apply_roofline(points, systems, facts, probe, overrides)
    return {"gguf": str(gguf), "facts": dataclasses.asdict(facts), "systems": assumptions,
            "machine_file": str(path) if probe else None,
            "machine": _probe_summary(probe) if probe else "no probe: run `scalellm bench --machine` first"}


def _probe_summary(probe: dict) -> dict:
    return {"cpu": probe["cpu"]["model"], "cores": probe["cores"], "probed_at": probe.get("probed_at"),
            "read_gb_s": probe["memory_bandwidth"]["all_cores_gb_s"],
            "peak_gflop_s": {d: v["peak_gflop_s"] for d, v in probe["matmul"].items()},
            "onednn_kernels": probe.get("kernels", {}).get("onednn_kernels", [])}


def _finish(args: argparse.Namespace, document: dict) -> int:
    files = write_report(args.output, document)
    print(results_table(document["aggregates"]))
    print("\nwrote " + ", ".join(str(f) for f in files))
    failed = sum(run["summary"]["failed"] for run in document["runs"])
    missing = [name for name, info in document["systems"].items() if "error" in info]
    if missing:
        print(f"systems not measured: {', '.join(missing)} (see results.json)", file=sys.stderr)
    return 1 if (failed or missing or not document["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scalellm bench", description=__doc__.split("\n\n")[0])
    add_bench_args(parser)
    return run_bench(parser.parse_args(argv))
