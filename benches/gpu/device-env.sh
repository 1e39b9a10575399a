#!/usr/bin/env bash
# On the GPU machine: source this before running a binary built by benches/gpu/prepare.sh. It
# puts the CUDA 13 libraries (cublas, cublasLt, curand, cudart) that ship with the machine's
# PyTorch on LD_LIBRARY_PATH; libcuda.so.1 comes from the driver.
PY="${TORCH_PY:-$(command -v python3)}"
_dirs=$("$PY" - <<'P'
import glob, os, site
seen = []
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True):
        d = os.path.dirname(f)
        if d not in seen: seen.append(d)
print(":".join(seen))
P
)
export LD_LIBRARY_PATH="${_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
