#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry devbin/): the CUDA kernel tests, then the `1b`
# preset (bf16, batch 8 × 512) for lorakit and PyTorch + PEFT eager / torch.compile / gradient
# checkpointing, each pair in this one call, on this card. Results go to $OUT (or ./gpu-out).
#   bash benches/gpu/run.sh [STEPS]
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"; mkdir -p "$out"
steps="${1:-10}"
[ -f devbin/device-env.sh ] && source devbin/device-env.sh
for f in devbin/*.xz; do xz -dkf "$f"; done
chmod +x devbin/train_throughput devbin/cuda_kernels
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
./devbin/cuda_kernels --test-threads 1 > "$out/cuda_kernels.txt" 2>&1; echo "cuda_kernels exit $?" >> "$out/cuda_kernels.txt"
args=(1b 8 512 "$steps" --device cuda --dtype bf16)
./devbin/train_throughput "${args[@]}" > "$out/lorakit.json" 2> "$out/lorakit.err"
./devbin/train_throughput "${args[@]}" --checkpointing > "$out/lorakit-ckpt.json" 2> "$out/lorakit-ckpt.err"
python3 benches/train_throughput_peft.py "${args[@]}" > "$out/peft.json" 2> "$out/peft.err"
python3 benches/train_throughput_peft.py "${args[@]}" --compile > "$out/peft-compile.json" 2> "$out/peft-compile.err"
python3 benches/train_throughput_peft.py "${args[@]}" --checkpointing > "$out/peft-ckpt.json" 2> "$out/peft-ckpt.err"
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(n):
    try:
        return json.loads((out / n).read_text().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
rows = {n: load(n + ".json") for n in ["lorakit", "lorakit-ckpt", "peft", "peft-compile", "peft-ckpt"]}
for n, r in rows.items():
    if "tokens_per_s" in r:
        print(f"{n:14s} {r['tokens_per_s']:9.0f} tok/s  {r['ms_per_step']:8.1f} ms/step  peak {r['peak_bytes'] / 2**30:6.2f} GiB  cold start {r['cold_start_s']:.1f} s  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
    else:
        print(f"{n:14s} {r}")
def ratio(a, b):
    if "tokens_per_s" in rows[a] and "tokens_per_s" in rows[b]:
        print(f"{a} / {b}: {rows[a]['tokens_per_s'] / rows[b]['tokens_per_s']:.2f}x tokens/s, {rows[a]['peak_bytes'] / rows[b]['peak_bytes']:.2f}x peak memory")
ratio("lorakit", "peft"); ratio("lorakit", "peft-compile"); ratio("lorakit-ckpt", "peft-ckpt")
PY
