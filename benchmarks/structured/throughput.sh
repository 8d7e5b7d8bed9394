#!/usr/bin/env bash
# Output tokens/s with and without a 10-field JSON schema, against one default serve of the 1.5B at
# C=16, alternated: plain, schema, plain, schema. Each run has prompts of its own seed, so none is
# served from the prefix cache of another.
#
#   benchmarks/structured/throughput.sh        # OUT=benchmarks/structured/results by default
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
MODEL=${MODEL:-$(../shared/models/fetch.sh qwen2.5-coder-1.5b)}
PORT=${PORT:-8322}
C=${C:-16}
REQUESTS=${REQUESTS:-32}
OUT=${OUT:-benchmarks/structured/results}
mkdir -p "$OUT"
scalellm serve "$MODEL" --port "$PORT" --no-request-log > "$OUT/serve.log" 2>&1 &
serve=$!
trap 'kill -INT $serve 2>/dev/null || true; wait $serve 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "ScaleLLM serving" "$OUT/serve.log" && break; sleep 1; done
head -1 "$OUT/serve.log"
seed=0
for round in 1 2; do
  for kind in plain schema; do
    seed=$((seed + 1))
    flags=()
    [ "$kind" = schema ] && flags=(--response-format json_schema --schema benchmarks/structured/schema10.json)
    scalellm bench --url "http://127.0.0.1:$PORT" --endpoint chat --concurrency "$C" --requests "$REQUESTS" \
        --input-len 75 --seed "$seed" "${flags[@]}" --output "$OUT/$kind-$round" > "$OUT/$kind-$round.log" 2>&1
    echo "$kind $round: $(grep -E '^\| server' "$OUT/$kind-$round.log")"
  done
done
