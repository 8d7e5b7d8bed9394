#!/usr/bin/env bash
# The gateway under overload: does it shed fast, and does its CPU per served request stay put?
#
# Two gateways over the same two gRPC mock replicas (32 tokens 5 ms apart, as run.sh), measured in
# turn, repeat after repeat: `fits` with room for every client (--max-queue 1024), `sheds` with
# --max-queue Q below the clients in flight, so the clients beyond it get a 429 at once (and, in the
# closed loop, send again at once: the harshest case for the gateway's CPU). C clients, streamed.
# "CPU ms per served" is the gateway's CPU over the requests that got a 200, shedding included.
#
#   benchmarks/gateway/overload.sh                  # C=128 Q=32 REQUESTS=3000 REPEAT=3
# (REQUESTS counts the shed ones too.) "CPU ms per 429" is the sheds run's CPU beyond what its served
# requests cost in the fits run, over the requests it shed.
# Writes OUT (default benchmarks/gateway/results-overload): one folder per run, summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
REQUESTS=${REQUESTS:-3000}
REPEAT=${REPEAT:-3}
C=${C:-128}
Q=${Q:-32}
OUT=${OUT:-benchmarks/gateway/results-overload}
MOCK="--engine mock --tpot-ms 5 --ttft-ms 5"
mkdir -p "$OUT/logs"

source benchmarks/gateway/lib.sh  # pids, cleanup on exit, free_port, wait_port

replicas=()
for i in 1 2; do
  port=$(free_port)
  "$SCALELLM" replica $MOCK --port "$port" > "$OUT/logs/replica-$i.log" 2>&1 & pids+=($!)
  wait_port "$port"
  replicas+=(--replica "127.0.0.1:$port")
done
declare -A url pid
for setting in fits:1024 sheds:$Q; do
  name=${setting%%:*}
  port=$(free_port)
  "$SCALELLM" gateway --port "$port" "${replicas[@]}" --no-request-log --max-queue "${setting#*:}" \
    > "$OUT/logs/$name.log" 2>&1 & pid[$name]=$!
  pids+=(${pid[$name]}); wait_port "$port"; url[$name]="http://127.0.0.1:$port"
done
sleep 1

for repeat in $(seq "$REPEAT"); do
  for name in fits sheds; do
    "$SCALELLM" bench --url "${url[$name]}" --label "$name" --concurrency "$C" --requests "$REQUESTS" --repeat 1 \
      --output-len 32 --stream --server-pids "${pid[$name]}" --output "$OUT/$name-r$repeat" \
      > "$OUT/logs/$name-r$repeat.bench.log" 2>&1 || true
    echo "$(date +%T) $name r$repeat done"
  done
done

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
def runs(name):
    return [json.loads(p.read_text())["aggregates"][0]["metrics"] for p in sorted(out.glob(f"{name}-r*/results.json"))]
def values(rows, key):
    return [r[key]["median"] for r in rows if r.get(key) and r[key].get("median") is not None]
def cell(v, d):
    return f"{statistics.median(v):.{d}f} ({min(v):.{d}f}–{max(v):.{d}f})" if v else "–"
fits, sheds = runs("fits"), runs("sheds")
served_cpu = statistics.median(values(fits, "server_cpu_ms_per_request")) if fits else None
print("| gateway | served | shed (429) | CPU ms per served | CPU ms per 429 | E2E p50 ms of served | served req/s |")
print("|---|---|---|---|---|---|---|")
for name, rows in (("fits", fits), ("sheds", sheds)):
    per_429 = []
    if served_cpu is not None and name == "sheds":  # CPU beyond what the served requests cost when all fit
        per_429 = [(r["server_cpu_seconds"]["median"] * 1000 - r["completed"]["median"] * served_cpu)
                   / max(r["failed"]["median"], 1) for r in rows]
    print(f"| {name} | {cell(values(rows, 'completed'), 0)} | {cell(values(rows, 'failed'), 0)} | "
          f"{cell(values(rows, 'server_cpu_ms_per_request'), 3)} | {cell(per_429, 3)} | "
          f"{cell(values(rows, 'median_e2el_ms'), 1)} | {cell(values(rows, 'request_throughput'), 0)} |")
PY
