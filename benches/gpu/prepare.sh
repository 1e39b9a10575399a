#!/usr/bin/env bash
# Builds everything the GPU check needs, on this (GPU-less) machine, into devbin/ (git-ignored):
# the CUDA bench and the CUDA kernel tests, xz-compressed to fit the device tool's carry limit.
#   bash benches/gpu/prepare.sh      then carry devbin/ and run benches/gpu/run.sh there
set -euo pipefail
cd "$(dirname "$0")/../.."
source ../shared/cuda/toolchain.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
rm -rf devbin && mkdir -p devbin
build() { # cargo args...; prints the executable's path
  cargo build --release --features cuda "$@" --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' | tail -1
}
bench=$(build --bench train_throughput)
tests=$(cargo test --release --features cuda -p lorakit-models --test cuda_kernels --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable"): print(m["executable"])' | tail -1)
for f in "$bench:train_throughput" "$tests:cuda_kernels"; do
  src=${f%%:*}; dst=devbin/${f##*:}
  cp "$src" "$dst" && strip "$dst" && xz -T2 -f -6 "$dst"
done
cp ../shared/cuda/device-env.sh devbin/
grep -qx '/devbin/' .git/info/exclude 2>/dev/null || echo '/devbin/' >> .git/info/exclude
ls -la devbin
