#!/usr/bin/env bash
# 1 MiB inputs (and 1 MiB outputs): system shared memory vs sending the bytes, perf_analyzer on
# an FP32 identity model (262144 elements), gRPC and HTTP, concurrency 1 and 4, ROUNDS rounds
# (default 1) alternating the modes so drift on a shared machine shows up.
# Usage: bench/shared_memory.sh [ROUNDS]   (from the repository root, venv in .venv)
set -euo pipefail
rounds=${1:-1}
py=${PYTHON:-.venv/bin/python}
pa=${PERF_ANALYZER:-.perf_analyzer/perf_analyzer}
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/models/identity_1mib/1"
cp tests/models/identity/model.py "$work/models/identity_1mib/1/"
cat >"$work/models/identity_1mib/config.pbtxt" <<'CFG'
name: "identity_1mib"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ 262144 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 262144 ] } ]
CFG
$py -m convoy serve --model-repository "$work/models" --host 127.0.0.1 \
  --http-port 0 --grpc-port 0 --metrics-port -1 --allow-client-shm >"$work/out" 2>"$work/err" &
server=$!
until grep -qs "^convoy: serving" "$work/out"; do sleep 0.1; done
grpc=$(sed -n 's/.* grpc=\([0-9]*\).*/\1/p' "$work/out")
http=$(sed -n 's/.* http=\([0-9]*\).*/\1/p' "$work/out")
printf "protocol,concurrency,round,mode,infer_per_s,p50_us\n"
for round in $(seq 1 "$rounds"); do
  for proto in grpc http; do
    port=$grpc; [ "$proto" = http ] && port=$http
    for c in 1 4; do
      for mode in wire shm; do
        extra=()
        [ "$mode" = shm ] && extra=(--shared-memory system --output-shared-memory-size 1048576)
        "$pa" -m identity_1mib -u "127.0.0.1:$port" -i "$proto" --concurrency-range "$c" \
          --measurement-interval 3000 --stability-percentage 100 --max-trials 20 "${extra[@]}" \
          -f "$work/pa.csv" >/dev/null
        read -r ips p50 < <(awk -F, 'NR==2 {print $2, $10}' "$work/pa.csv")
        echo "$proto,$c,$round,$mode,$ips,$p50"
      done
    done
  done
done
