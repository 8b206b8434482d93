#!/usr/bin/env bash
# Make Convoy importable on a bare GPU machine that has torch, grpcio and protobuf but no network:
# wheels carried in .whl/ go to /tmp/site; convoy.* is assembled from the source folders with
# links (the package-dir mapping an install would do). Source it: `. bench/device_env.sh`.
set -e
root=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
rm -rf /tmp/convoy-pkgs && mkdir -p /tmp/convoy-pkgs/convoy
for entry in "$root"/convoy/*; do ln -s "$entry" /tmp/convoy-pkgs/convoy/; done
for layer in server batching runtimes protos loadtests; do ln -s "$root/$layer" "/tmp/convoy-pkgs/convoy/$layer"; done
# The checkout's own convoy/ folder must not shadow the assembled package.
export PYTHONSAFEPATH=1
export PYTHONPATH=/tmp/site:/tmp/convoy-pkgs${PYTHONPATH:+:$PYTHONPATH}
export LD_LIBRARY_PATH="$root/.perf_analyzer/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
set +e
