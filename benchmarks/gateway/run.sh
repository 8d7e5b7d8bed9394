#!/usr/bin/env bash
# The gateway alone: what it costs in CPU and latency to put a router in front of two replicas.
#
# Two mock replicas stream 32 tokens 5 ms apart (no model), and a closed loop of C=64 streamed chat
# requests (and the same non-streamed) goes through, side by side:
#   direct       the client talks to one HTTP mock replica (`serve --no-gateway --engine mock`): no router
#   vllm-router  the Rust vllm-router 0.1.17 (power_of_two) over two such HTTP mock replicas
#   scalellm     `scalellm gateway` over two gRPC mock replicas (`scalellm replica --engine mock`)
# The CPU reported is the router process's alone (--server-pids); the added latency is a system's
# E2E/TTFT p50 minus direct's, so a router that adds nothing shows about 0.
#
#   benchmarks/gateway/run.sh                  # REQUESTS=2000 REPEAT=3 C=64
#   REQUESTS=500 REPEAT=1 benchmarks/gateway/run.sh
#
# vllm-router is installed into ~/.cache/scalellm/peers/router on first use (pip install vllm-router).
# Writes OUT (default benchmarks/gateway/results): one folder per system and mode, summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
REQUESTS=${REQUESTS:-2000}
REPEAT=${REPEAT:-3}
C=${C:-64}
OUT=${OUT:-benchmarks/gateway/results}
ROUTER_VENV=${ROUTER_VENV:-$HOME/.cache/scalellm/peers/router}
MOCK="--engine mock --tpot-ms 5 --ttft-ms 5"
mkdir -p "$OUT/logs"

source benchmarks/gateway/lib.sh  # pids, cleanup on exit, free_port, wait_port, wait_http, stop_all
install_router

bench() {  # NAME URL ROUTER_PID
  for mode in stream no-stream; do
    "$SCALELLM" bench --url "$2" --label "$1" --concurrency "$C" --requests "$REQUESTS" --repeat "$REPEAT" \
      --output-len 32 --$mode ${3:+--server-pids $3} --output "$OUT/$1-$mode" > "$OUT/logs/$1-$mode.bench.log"
  done
}

# direct: one HTTP mock replica, no router
port=$(free_port)
"$SCALELLM" serve --no-gateway $MOCK --port "$port" --no-request-log > "$OUT/logs/direct.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$port/health"
bench direct "http://127.0.0.1:$port" ""
stop_all

# vllm-router over two HTTP mock replicas
workers=()
for _ in 1 2; do
  port=$(free_port)
  "$SCALELLM" serve --no-gateway $MOCK --port "$port" --no-request-log > "$OUT/logs/vllm-router-mock-$port.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$port/health"
  workers+=("http://127.0.0.1:$port")
done
start_router "$OUT/logs/vllm-router.log" "${workers[@]}"
bench vllm-router "$router_url" "$router"
stop_all

# scalellm gateway over two gRPC mock replicas
replicas=()
for _ in 1 2; do
  port=$(free_port)
  "$SCALELLM" replica $MOCK --port "$port" > "$OUT/logs/scalellm-mock-$port.log" 2>&1 & pids+=($!)
  wait_port "$port"
  replicas+=(--replica "127.0.0.1:$port")
done
port=$(free_port)
"$SCALELLM" gateway --port "$port" "${replicas[@]}" --no-request-log > "$OUT/logs/scalellm.log" 2>&1 & gateway=$!
pids+=($gateway)
wait_http "http://127.0.0.1:$port/health"
bench scalellm "http://127.0.0.1:$port" "$gateway"
stop_all

"$PYTHON" benchmarks/gateway/summarize.py "$OUT" | tee "$OUT/summary.md"
