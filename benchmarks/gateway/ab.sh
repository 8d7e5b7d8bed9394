#!/usr/bin/env bash
# The gateway A/B: versions of the scalellm gateway side by side with vllm-router, interleaved.
#
# run.sh measures one system after another; on a machine shared with other work the load drifts
# between them. Here every system is up at once and the runs alternate, repeat after repeat:
#   for each repeat: for stream, no-stream: direct, vllm-router, each scalellm VARIANT (one run each)
# so a drift hits all of them alike. Same workload as run.sh (C=64 chat requests, 32 tokens 5 ms apart
# from mock replicas); CPU is each router process's alone.
#
#   VARIANTS="before=/tmp/old-checkout after=." benchmarks/gateway/ab.sh
#       each VARIANT is NAME=DIR: the gateway runs with DIR first on PYTHONPATH (DIR/scalellm), so an
#       older version is a `git archive REV scalellm | tar -x -C DIR`; all variants share the same two
#       gRPC mock replicas (run from this checkout)
#   REQUESTS=1000 REPEAT=3 C=64 ROUTER=1 (ROUTER=0 skips vllm-router and direct)
#   UVICORN_SITE=DIR: also run this checkout's gateway handler on uvicorn (uvicorn_gateway.py; DIR is a
#       site-packages holding uvicorn, e.g. vllm-router's venv's), as the system "uvicorn"
#   HTTP_MOCK_DIR=DIR: the code of the HTTP mock replicas (direct, and behind vllm-router), as for a
#       variant (default: this checkout, which accepts the SGLang fields vllm-router adds).
#
# Writes OUT (default benchmarks/gateway/results-ab): SYSTEM-MODE-rN/ per run, summary.md (ab_summarize.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
REQUESTS=${REQUESTS:-1000}
REPEAT=${REPEAT:-3}
C=${C:-64}
ROUTER=${ROUTER:-1}
VARIANTS=${VARIANTS:-"scalellm=."}
HTTP_MOCK_DIR=$(cd "${HTTP_MOCK_DIR:-.}" && pwd)
OUT=${OUT:-benchmarks/gateway/results-ab}
ROUTER_VENV=${ROUTER_VENV:-$HOME/.cache/scalellm/peers/router}
MOCK="--engine mock --tpot-ms 5 --ttft-ms 5"
mkdir -p "$OUT/logs"

source benchmarks/gateway/lib.sh  # pids, cleanup on exit, free_port, wait_port
http_mock() {  # LOG: start an HTTP mock replica; its URL in $mock_url (no subshell: its pid must reach pids)
  local port; port=$(free_port)
  PYTHONPATH="$HTTP_MOCK_DIR" "$PYTHON" -P -m scalellm.cli serve --no-gateway $MOCK --port "$port" --no-request-log > "$1" 2>&1 & pids+=($!)
  wait_port "$port"
  mock_url="http://127.0.0.1:$port"
}

declare -A url pid
systems=()
if [ "$ROUTER" = 1 ]; then
  install_router
  http_mock "$OUT/logs/direct.log"; url[direct]=$mock_url; pid[direct]=""; systems+=(direct)
  workers=()
  for i in 1 2; do http_mock "$OUT/logs/router-mock-$i.log"; workers+=("$mock_url"); done
  start_router "$OUT/logs/vllm-router.log" "${workers[@]}"
  pid[vllm-router]=$router; url[vllm-router]=$router_url; systems+=(vllm-router)
fi
replicas=()
for i in 1 2; do
  port=$(free_port)
  "$SCALELLM" replica $MOCK --port "$port" > "$OUT/logs/replica-$i.log" 2>&1 & pids+=($!)
  wait_port "$port"
  replicas+=(--replica "127.0.0.1:$port")
done
for variant in $VARIANTS; do
  name=${variant%%=*}; dir=$(cd "${variant#*=}" && pwd)
  port=$(free_port)
  PYTHONPATH="$dir" "$PYTHON" -P -m scalellm.cli gateway --port "$port" "${replicas[@]}" --no-request-log \
    > "$OUT/logs/$name.log" 2>&1 & pid[$name]=$!
  pids+=(${pid[$name]}); wait_port "$port"; url[$name]="http://127.0.0.1:$port"; systems+=("$name")
done
if [ -n "${UVICORN_SITE:-}" ]; then
  port=$(free_port)
  PYTHONPATH="$(pwd):$UVICORN_SITE" "$PYTHON" -P benchmarks/gateway/uvicorn_gateway.py --port "$port" "${replicas[@]}" \
    > "$OUT/logs/uvicorn.log" 2>&1 & pid[uvicorn]=$!
  pids+=(${pid[uvicorn]}); wait_port "$port"; url[uvicorn]="http://127.0.0.1:$port"; systems+=(uvicorn)
fi
sleep 1

for repeat in $(seq "$REPEAT"); do
  for mode in stream no-stream; do
    for system in "${systems[@]}"; do
      "$SCALELLM" bench --url "${url[$system]}" --label "$system" --concurrency "$C" --requests "$REQUESTS" \
        --repeat 1 --output-len 32 --$mode ${pid[$system]:+--server-pids ${pid[$system]}} \
        --output "$OUT/$system-$mode-r$repeat" > "$OUT/logs/$system-$mode-r$repeat.bench.log"
      echo "$(date +%T) $system $mode r$repeat done"
    done
  done
done

"$PYTHON" benchmarks/gateway/ab_summarize.py "$OUT" "${systems[@]}" | tee "$OUT/summary.md"
