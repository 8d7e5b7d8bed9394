# Shared by the gateway benchmarks (run.sh, ab.sh, rate.sh, tracing.sh, overload.sh): sourced after
# PYTHON (and, for install_router, ROUTER_VENV) is set. Processes started with `& pids+=($!)` are killed when the script exits.
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {  # PORT: until something listens on it
  for _ in $(seq 300); do
    "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "nothing listens on $1" >&2; exit 1
}
wait_http() {  # URL: until it answers 200
  for _ in $(seq 300); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.2
  done
  echo "no answer from $1" >&2; exit 1
}
stop_all() { cleanup; pids=(); }
start_router() {  # LOG WORKER_URL...: vllm-router (power of two) over the workers, pinned to ROUTER_CPUS if
  # set; its pid in $router and its URL in $router_url once it answers
  local log=$1; shift
  local port; port=$(free_port)
  local pin=(); [ -n "${ROUTER_CPUS:-}" ] && pin=(taskset -c "$ROUTER_CPUS")
  "${pin[@]}" "$ROUTER_VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" --worker-urls "$@" \
    --policy power_of_two --log-level warning > "$log" 2>&1 & router=$!; pids+=($router)
  router_url="http://127.0.0.1:$port"
  wait_http "$router_url/health"
}
install_router() {  # vllm-router 0.1.17 into ROUTER_VENV, once
  [ -x "$ROUTER_VENV/bin/vllm-router" ] && return 0
  python3 -m venv "$ROUTER_VENV"
  "$ROUTER_VENV/bin/pip" install -q vllm-router==0.1.17
}
