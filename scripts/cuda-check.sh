#!/usr/bin/env bash
# Type-checks the `cuda` feature (clippy, every target) on a machine without a GPU, so the code
# behind #[cfg(feature = "cuda")] cannot rot unseen. lorakit's own kernels (crates/ops/csrc/
# fused.cu) are compiled by a real nvcc 13.0, installed once from PyPI; candle's kernels are not
# compiled (they are candle's to test, and on two cores take longer than everything else in CI):
# a stand-in `nvcc` writes empty outputs for them, which is all a type-check reads.
#   bash scripts/cuda-check.sh          (target dir: target-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
root="${LORAKIT_CUDA_ROOT:-$HOME/.cache/lorakit-cuda13}"
cu="$root/nvcc13/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ]; then
  # nvcc and the headers fused.cu includes; no libraries: nothing is linked
  python3 -m pip install -q --no-deps --target "$root/nvcc13" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96
fi
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
cat > "$shim/nvcc" <<SH
#!/usr/bin/env bash
# lorakit's kernels and version queries go to the real nvcc; anything else gets an empty output
for a in "\$@"; do
  case "\$a" in --version|*/csrc/fused.cu|csrc/fused.cu) exec "$cu/bin/nvcc" "\$@";; esac
done
out=""; dir=""; prev=""; src=""
for a in "\$@"; do
  [ "\$prev" = "-o" ] && out="\$a"
  [ "\$prev" = "--output-directory" ] && dir="\$a"
  case "\$a" in *.cu) src="\$a";; esac
  prev="\$a"
done
# "--ptx --output-directory D x.cu" writes D/x.ptx
[ -z "\$out" ] && [ -n "\$dir" ] && [ -n "\$src" ] && out="\$dir/\$(basename "\$src" .cu).ptx"
[ -n "\$out" ] && : > "\$out"
exit 0
SH
chmod +x "$shim/nvcc"
export NVCC="$shim/nvcc" PATH="$shim:$cu/bin:$PATH" CUDA_HOME="$cu" CUDA_COMPUTE_CAP=90
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target-cuda}" \
  cargo clippy --workspace --all-targets --features cuda -- -D warnings
