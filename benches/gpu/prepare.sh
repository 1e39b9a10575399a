#!/usr/bin/env bash
# Builds everything the GPU checks need, on this (GPU-less) machine, into devbin/ (git-ignored):
# the CUDA benches, the CUDA kernel tests and the `lorakit` binary, xz-compressed to fit the
# device tool's carry limit.
#   bash benches/gpu/prepare.sh      then carry devbin/ and run benches/gpu/run.sh or
#                                    benches/gpu/long_rows.sh there
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/cuda-toolchain.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}"
rm -rf devbin && mkdir -p devbin
# the executable cargo built for the target named $1 (cargo args follow)
build() {
  local name=$1; shift
  cargo "$@" --release --features cuda --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("executable") and m["target"]["name"] == sys.argv[1]: print(m["executable"])' "$name" | tail -1
}
bench=$(build train_throughput build --bench train_throughput)
cli=$(build lorakit build -p lorakit --bin lorakit)
ops=$(build op_profile build --bench op_profile)
attn=$(build attention_scaling build --bench attention_scaling)
tests=$(build cuda_kernels test -p lorakit-models --test cuda_kernels --no-run)
for f in "$bench:train_throughput" "$ops:op_profile" "$attn:attention_scaling" "$tests:cuda_kernels" \
  "$cli:lorakit"; do
  src=${f%%:*}; dst=devbin/${f##*:}
  [ -n "$src" ] || { echo "prepare: no executable for ${f##*:}" >&2; exit 1; }
  cp "$src" "$dst" && strip "$dst" && xz -T2 -f -6 "$dst"
done
cp benches/gpu/device-env.sh devbin/
grep -qx '/devbin/' .git/info/exclude 2>/dev/null || echo '/devbin/' >> .git/info/exclude
ls -la devbin
