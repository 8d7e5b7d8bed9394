#!/usr/bin/env bash
# Where a default serve's replicas spend their time under the standard workload at concurrency C:
# py-spy with native frames over every replica for 15 s of a closed loop, then aggregate.py.
#
#   .venv/bin/pip install py-spy           # once; a profiling tool, not a dependency
#   C=64 benchmarks/profile/replicas.sh    # OUT=benchmarks/profile/out by default
#   MODEL=$(../shared/models/fetch.sh qwen2.5-coder-1.5b) C=1 REQUESTS=8 benchmarks/profile/replicas.sh
#
# py-spy pauses a process for each native sample (100 per second), so the run's own figures are a
# little below an unprofiled one's; the shares are what it is for.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
C=${C:-64}
PORT=${PORT:-8123}
OUT=${OUT:-benchmarks/profile/out}
MODEL=${MODEL:-}
REQUESTS=${REQUESTS:-$(( C * 4 > 48 ? C * 4 : 48 ))}
mkdir -p "$OUT"
scalellm serve $MODEL --port "$PORT" --no-request-log > "$OUT/serve.log" 2>&1 &
serve=$!
trap 'kill -INT $serve 2>/dev/null || true; wait $serve 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q "ScaleLLM serving" "$OUT/serve.log" && break; sleep 1; done
head -1 "$OUT/serve.log"
replicas=$(pgrep -P "$serve" -f "cli replica" | tr "\n" " ")
scalellm bench --url "http://127.0.0.1:$PORT" --concurrency "$C" --requests "$REQUESTS" \
    --input-len 75 --output "$OUT/bench-c$C" > "$OUT/bench-c$C.log" 2>&1 &
bench=$!
sleep 6  # past the warm-up and the first prefills
for pid in $replicas; do py-spy record --native -r 100 -d 15 -f raw -o "$OUT/c$C-$pid.txt" -p "$pid" > /dev/null 2>&1 & done
wait $bench
grep "^| server" "$OUT/bench-c$C.log" || true
.venv/bin/python benchmarks/profile/aggregate.py "$OUT"/c"$C"-*.txt
