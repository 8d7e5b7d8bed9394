# Shared by the gateway benchmarks (run.sh, ab.sh, tracing.sh, overload.sh): sourced after
# PYTHON is set. Processes started with `& pids+=($!)` are killed when the script exits.
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
