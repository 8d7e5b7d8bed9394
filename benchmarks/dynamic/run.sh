#!/usr/bin/env bash
# Dynamic shapes on the default model (int8): a closed loop stepping C=1 -> 64 -> 1, served by
# `scalellm serve --shape auto` (with the profile, and without: the one-replica-per-request rule) and
# by each fixed shape of this machine, one after the other.
#
#   benchmarks/dynamic/run.sh                      # profile (if missing), then the stepped runs
#   STEPS=1:30,64:60,1:30 SETTLE=20 benchmarks/dynamic/run.sh   # a shorter, indicative run
#
# Writes benchmarks/dynamic/profile.json (+ .png, profile-bench/) and OUT/ (default
# benchmarks/dynamic/steps): results.json, results.md, timeline.png, logs/, phases.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALELLM=${SCALELLM:-.venv/bin/scalellm}
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-1:60,64:120,1:60}
SETTLE=${SETTLE:-30}
PROFILE=${PROFILE:-benchmarks/dynamic/profile.json}
OUT=${OUT:-benchmarks/dynamic/steps}
ENGINE_FLAGS=${ENGINE_FLAGS:---quantization int8}
SHAPES=${SHAPES:-$("$PYTHON" -c 'from scalellm.shape.shape import Machine; print(" ".join(s.label for s in Machine.detect().feasible_shapes()))')}

if [ ! -f "$PROFILE" ]; then
  "$SCALELLM" profile $ENGINE_FLAGS --concurrency 1,4,16,64 --output "$PROFILE"
fi

systems=auto,auto-rule
commands=(--system-cmd "auto={scalellm} serve --port {port} $ENGINE_FLAGS --no-request-log --shape auto --profile $PROFILE"
          --system-cmd "auto-rule={scalellm} serve --port {port} $ENGINE_FLAGS --no-request-log --shape auto")
for shape in $SHAPES; do
  systems+=",fixed-$shape"
  commands+=(--system-cmd "fixed-$shape={scalellm} serve --port {port} $ENGINE_FLAGS --no-request-log --shape $shape")
done

"$SCALELLM" bench --compare --systems "$systems" "${commands[@]}" \
  --load-steps "$STEPS" --settle "$SETTLE" --output "$OUT"
"$PYTHON" benchmarks/dynamic/phases.py "$OUT/results.json" | tee "$OUT/phases.md"
