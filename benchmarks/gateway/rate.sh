#!/usr/bin/env bash
# The highest request rate a router sustains on one core with at most 5 ms added to the p99 latency.
#
# The router (vllm-router, or the ScaleLLM gateway) runs alone on core 0 (taskset); its two mock
# replicas (32 tokens 5 ms apart, as run.sh) and the client run on core 1. `direct` is the client
# against one HTTP mock replica on core 1, at the same rates: "added p99" is a router's E2E p99 minus
# direct's at that rate. Open loop: Poisson arrivals at each rate of RATES for SECONDS each, streamed
# and not. On a 2-core machine the client and the mocks share core 1, so the sweep also finds where
# they give out: when direct's own p99 rises, the rates beyond say nothing about the routers. The
# router's CPU per request and how busy that leaves its core say how far it is from its own limit.
#
#   benchmarks/gateway/rate.sh             # RATES="100 200 400 600 800 1000" SECONDS_PER_RATE=6
# Writes OUT (default benchmarks/gateway/results-rate): one folder per run and summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
RATES=${RATES:-100 200 400 600 800 1000}
SECONDS_PER_RATE=${SECONDS_PER_RATE:-6}
OUT=${OUT:-benchmarks/gateway/results-rate}
ROUTER_VENV=${ROUTER_VENV:-$HOME/.cache/scalellm/peers/router}
MOCK="--engine mock --tpot-ms 5 --ttft-ms 5"
ROUTER_CORE=0
REST_CORE=1
mkdir -p "$OUT/logs"

source benchmarks/gateway/lib.sh  # pids, cleanup on exit, free_port, wait_port, wait_http, stop_all
install_router
on_rest() { taskset -c "$REST_CORE" "$@"; }  # in the foreground only: a backgrounded function is a subshell

sweep() {  # NAME URL [ROUTER_PID]
  for mode in stream no-stream; do
    for rate in $RATES; do
      on_rest "$SCALELLM" bench --url "$2" --label "$1" --concurrency 4096 --request-rate "$rate" \
        --requests $(( rate * SECONDS_PER_RATE )) --repeat 1 --output-len 32 --$mode ${3:+--server-pids $3} \
        --output "$OUT/$1-$mode-$rate" > "$OUT/logs/$1-$mode-$rate.bench.log" 2>&1 || true
      echo "$(date +%T) $1 $mode $rate/s done"
    done
  done
}

http_mock() {  # LOG: an HTTP mock replica on the rest core; sets $port
  port=$(free_port)
  taskset -c "$REST_CORE" "$SCALELLM" serve --no-gateway $MOCK --port "$port" --no-request-log > "$1" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$port/health"
}

http_mock "$OUT/logs/direct.log"
sweep direct "http://127.0.0.1:$port"
stop_all

workers=()
for i in 1 2; do
  http_mock "$OUT/logs/vllm-router-mock-$i.log"
  workers+=("http://127.0.0.1:$port")
done
ROUTER_CPUS=$ROUTER_CORE start_router "$OUT/logs/vllm-router.log" "${workers[@]}"
sweep vllm-router "$router_url" "$router"
stop_all

replicas=()
for i in 1 2; do
  port=$(free_port)
  taskset -c "$REST_CORE" "$SCALELLM" replica $MOCK --port "$port" > "$OUT/logs/scalellm-mock-$i.log" 2>&1 &
  pids+=($!)
  wait_port "$port"
  replicas+=(--replica "127.0.0.1:$port")
done
port=$(free_port)
taskset -c "$ROUTER_CORE" "$SCALELLM" gateway --port "$port" "${replicas[@]}" --no-request-log \
  > "$OUT/logs/scalellm.log" 2>&1 & gateway=$!; pids+=($gateway)
wait_http "http://127.0.0.1:$port/health"
sweep scalellm "http://127.0.0.1:$port" "$gateway"
stop_all

"$PYTHON" - "$OUT" "$RATES" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out, rates = Path(sys.argv[1]), [int(r) for r in sys.argv[2].split()]
def metric(name, mode, rate, key):
    path = out / f"{name}-{mode}-{rate}" / "results.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())["aggregates"][0]["metrics"]
    return m[key]["median"] if m.get(key) and m[key].get("median") is not None else None
for mode in ("stream", "no-stream"):
    print(f"\n{mode}: E2E p99 ms (added over direct), achieved req/s, the router's CPU, failed\n")
    print("| rate/s | direct | vllm-router | scalellm |")
    print("|---|---|---|---|")
    best = {"vllm-router": None, "scalellm": None}  # up to which every rate kept within 5 ms
    held = {"vllm-router": True, "scalellm": True}
    for rate in rates:
        base = metric("direct", mode, rate, "p99_e2el_ms")
        cells = []
        for name in ("direct", "vllm-router", "scalellm"):
            p99 = metric(name, mode, rate, "p99_e2el_ms")
            done = metric(name, mode, rate, "request_throughput")
            failed = metric(name, mode, rate, "failed")
            if p99 is None:
                cells.append("–")
                continue
            added = "" if name == "direct" or base is None else f" ({p99 - base:+.1f})"
            cpu = metric(name, mode, rate, "server_cpu_ms_per_request")
            busy = f", {cpu:.2f} ms CPU/req, core {cpu * done / 10:.0f}% busy" if cpu is not None else ""
            cells.append(f"{p99:.1f}{added}, {done:.0f}/s{busy}, {failed:.0f} failed")
            if name != "direct":
                held[name] = held[name] and base is not None and p99 - base <= 5 and not failed
                best[name] = rate if held[name] else best[name]
        print(f"| {rate} | " + " | ".join(cells) + " |")
    print(f"\nhighest rate (every lower one too) with added p99 <= 5 ms: vllm-router {best['vllm-router']}, scalellm {best['scalellm']}")
PY
