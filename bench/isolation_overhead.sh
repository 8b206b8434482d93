#!/usr/bin/env bash
# Per-batch cost of process isolation: add_sub in the server's process vs in a worker process
# (--isolation process), perf_analyzer over gRPC at concurrency 1 (p50) and 32 (throughput).
# Alternates the two modes ROUNDS times (default 2) so drift on a shared machine shows up.
# Usage: bench/isolation_overhead.sh [ROUNDS]   (from the repository root, venv in .venv)
set -euo pipefail
rounds=${1:-2}
py=${PYTHON:-.venv/bin/python}
pa=${PERF_ANALYZER:-.perf_analyzer/perf_analyzer}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
repo=$($py -c 'from convoy.cli import demo_repository; print(demo_repository())')
mkdir -p "$work/models" && cp -r "$repo/add_sub" "$work/models/"
printf "mode,round,c1_p50_us,c1_infer_per_s,c32_infer_per_s,c32_p50_us\n"
for round in $(seq 1 "$rounds"); do
  for mode in thread process; do
    rm -f "$work/out"  # never read the previous server's line
    $py -m convoy serve --model-repository "$work/models" --isolation "$mode" --host 127.0.0.1 \
      --http-port 0 --grpc-port 0 --metrics-port -1 >"$work/out" 2>"$work/err" &
    server=$!
    until grep -qs "^convoy: serving" "$work/out"; do sleep 0.1; done
    grpc=$(sed -n 's/.* grpc=\([0-9]*\).*/\1/p' "$work/out")
    row="$mode,$round"
    for c in 1 32; do
      "$pa" -m add_sub -u "127.0.0.1:$grpc" -i grpc --concurrency-range "$c" \
        --measurement-interval 4000 --stability-percentage 50 -f "$work/pa.csv" >/dev/null
      # CSV columns: Concurrency, Inferences/Second, ..., p50 latency (µs) is column 10.
      read -r ips p50 < <(awk -F, 'NR==2 {print $2, $10}' "$work/pa.csv")
      if [ "$c" = 1 ]; then row="$row,$p50,$ips"; else row="$row,$ips,$p50"; fi
    done
    echo "$row"
    kill "$server"; wait "$server" || true
  done
done
