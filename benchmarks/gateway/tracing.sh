#!/usr/bin/env bash
# What tracing costs the gateway: CPU per request with OpenTelemetry tracing off and on.
#
# The scalellm half of run.sh (`scalellm gateway` over two gRPC mock replicas streaming 32 tokens
# 5 ms apart, a closed loop of C=64 chat requests, streamed and not), twice: without an endpoint, and
# with --otlp-traces-endpoint on the gateway and both replicas pointing at a local OTLP/HTTP sink (a
# separate process that takes every export and answers 200, so the spans really are encoded and sent).
# The CPU reported is the gateway process's alone (--server-pids).
#
#   benchmarks/gateway/tracing.sh                     # REQUESTS=1000 REPEAT=3 C=64
#   REQUESTS=500 REPEAT=1 benchmarks/gateway/tracing.sh
#
# Writes OUT (default benchmarks/gateway/results-tracing): one folder per setting and mode, summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
REQUESTS=${REQUESTS:-1000}
REPEAT=${REPEAT:-3}
C=${C:-64}
OUT=${OUT:-benchmarks/gateway/results-tracing}
MOCK="--engine mock --tpot-ms 5 --ttft-ms 5"
mkdir -p "$OUT/logs"

source benchmarks/gateway/lib.sh  # pids, cleanup on exit, free_port, wait_port

sink=$(free_port)
"$PYTHON" - "$sink" > "$OUT/logs/otlp-sink.log" 2>&1 <<'PY' & pids+=($!)
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
wait_port "$sink"

for setting in off on; do
  tracing=()
  [ "$setting" = on ] && tracing=(--otlp-traces-endpoint "http://127.0.0.1:$sink/v1/traces")
  run_pids=()
  replicas=()
  for _ in 1 2; do
    port=$(free_port)
    "$SCALELLM" replica $MOCK --port "$port" "${tracing[@]}" > "$OUT/logs/replica-$setting-$port.log" 2>&1 &
    run_pids+=($!)
    wait_port "$port"
    replicas+=(--replica "127.0.0.1:$port")
  done
  port=$(free_port)
  "$SCALELLM" gateway --port "$port" "${replicas[@]}" --no-request-log "${tracing[@]}" \
    > "$OUT/logs/gateway-$setting.log" 2>&1 & gateway=$!
  run_pids+=($gateway)
  pids+=("${run_pids[@]}")
  wait_port "$port"
  sleep 1
  for mode in stream no-stream; do
    "$SCALELLM" bench --url "http://127.0.0.1:$port" --label "tracing-$setting" --concurrency "$C" \
      --requests "$REQUESTS" --repeat "$REPEAT" --output-len 32 --$mode --server-pids "$gateway" \
      --output "$OUT/tracing-$setting-$mode" > "$OUT/logs/tracing-$setting-$mode.bench.log"
  done
  for pid in "${run_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${run_pids[@]}" 2>/dev/null || true
done

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import sys
from pathlib import Path

sys.path.insert(0, "benchmarks/gateway")
from summarize import fmt, load, median_and_spread

out = Path(sys.argv[1])
print("| mode | tracing | gateway CPU ms/req | E2E p50 ms | TTFT p50 ms | req/s | failed |")
print("|---|---|---|---|---|---|---|")
for mode in ("stream", "no-stream"):
    for setting in ("off", "on"):
        row = load(out, f"tracing-{setting}", mode)
        metric = lambda key, digits: fmt(median_and_spread(row, key), digits=digits)
        print(f"| {mode} | {setting} | {metric('server_cpu_ms_per_request', 2)} | {metric('median_e2el_ms', 1)} | "
              f"{metric('median_ttft_ms', 1)} | {metric('request_throughput', 0)} | {row['metrics']['failed']['max']} |")
PY
