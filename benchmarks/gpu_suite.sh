#!/usr/bin/env bash
# The real-size GPU benchmarks, step by step, so a lent GPU's few calls each run what fits:
#
#   benchmarks/gpu_suite.sh OUT_DIR STEP...      e.g.  benchmarks/gpu_suite.sh "$OUT" engine-7b run-7b
#
# Steps: engine-ARCH (bench_engine.py, the inductor-fused variant included) and run-ARCH
# (bench_run.py), ARCH one of bench_engine's --arch names (7b, qwen3vl-8b, llava-7b, ...).
# Each step writes OUT_DIR/STEP.json (the raw report) and OUT_DIR/STEP.md (the printed table and
# any error), and is stopped after STEP_TIMEOUT seconds (default 540) so a slow step leaves the
# others' results in place; no step runs past TOTAL_TIMEOUT seconds from the suite's start
# (default 540: a lent machine's call ends at 600 s, wheel installs and file transfers included,
# and what a step killed by that limit had written would not come back). DEVICE (default cuda)
# runs it elsewhere, for a dry run of the script; ENGINE_ARGS and RUN_ARGS are added to every
# engine and run step (e.g. ENGINE_ARGS="--tune --cases fast").
# Exits non-zero when any step failed.
set -u
out=${1:?usage: gpu_suite.sh OUT_DIR STEP...}
shift
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
failed=0
for step in "$@"; do
  arch=${step#*-}
  case $step in
    engine-*) command=(python3 "$here/bench_engine.py" --arch "$arch" --device "${DEVICE:-cuda}" --fuse ${ENGINE_ARGS:-}) ;;
    run-*) command=(python3 "$here/bench_run.py" --arch "$arch" --device "${DEVICE:-cuda}" ${RUN_ARGS:-}) ;;
    *) echo "unknown step: $step" >&2; failed=1; continue ;;
  esac
  limit=$(( ${TOTAL_TIMEOUT:-540} - SECONDS ))
  (( limit > ${STEP_TIMEOUT:-540} )) && limit=${STEP_TIMEOUT:-540}
  if (( limit <= 0 )); then
    echo "!! $step not run: TOTAL_TIMEOUT reached" >&2; failed=1; continue
  fi
  echo "== $step (at most $limit s): ${command[*]}" >&2
  start=$SECONDS
  if ! timeout "$limit" "${command[@]}" --out "$out/$step.json" >"$out/$step.md" 2>&1; then
    failed=1
    echo "!! $step failed (see $out/$step.md)" >&2
  fi
  echo "== $step took $((SECONDS - start)) s" >&2
done
exit $failed
