#!/usr/bin/env bash
# Source this file to type-check or build the `cuda` feature on a machine without a GPU:
#   source scripts/cuda-toolchain.sh && cargo clippy --workspace --all-targets --features cuda
# Installs (once, into $LORAKIT_CUDA_ROOT, default ~/.cache/lorakit-cuda13) nvcc 13.0, the CUDA
# headers and libraries from NVIDIA's PyPI wheels, and a link-time stand-in for the driver
# library (libcuda.so.1 comes from the GPU machine's driver at run time; never ship the stand-in).
# CUDA 13.0 is pinned: PTX from a newer nvcc may be too new for a driver 580 (CUDA 13.0) to JIT.
LORAKIT_CUDA_ROOT="${LORAKIT_CUDA_ROOT:-$HOME/.cache/lorakit-cuda13}"
CU="$LORAKIT_CUDA_ROOT/pycuda13/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ] || [ ! -f "$CU/lib/stubs/libcuda.so" ]; then
  mkdir -p "$LORAKIT_CUDA_ROOT"
  python3 -m pip install -q --no-deps --target "$LORAKIT_CUDA_ROOT/pycuda13" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 || return 1
  # the wheels ship only libX.so.N: add the link-time names
  ( cd "$CU/lib" || exit 1
    for l in cublas cublasLt curand nvrtc cudart; do
      f=$(ls "lib$l.so."* | grep -v alt | head -1); ln -sfn "$f" "lib$l.so"
    done ) || return 1
  ln -sfn lib "$CU/lib64"
  # the driver API names cudarc links against, from its sources (run `cargo fetch` first)
  mkdir -p "$CU/lib/stubs"
  cargo fetch -q || return 1
  python3 - "$CU/lib/stubs/libcuda_stub.c" <<'PY' || return 1
import glob, os, re, sys
home = os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo"))
srcs = glob.glob(os.path.join(home, "registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs"))
names = set()
for s in srcs:
    names |= set(re.findall(r"^pub unsafe fn (cu[A-Za-z0-9_]+)\(", open(s).read(), re.M))
if not names:
    sys.exit("cudarc sources not found under " + home)
open(sys.argv[1], "w").write("".join(f"void {n}(void) {{}}\n" for n in sorted(names)))
PY
  cc -shared -fPIC -o "$CU/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$CU/lib/stubs/libcuda_stub.c" || return 1
fi
export CUDA_HOME="$CU"
export PATH="$CU/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # H100/H200
export LIBRARY_PATH="$CU/lib/stubs:$CU/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
