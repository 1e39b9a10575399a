#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry devbin/): the CUDA kernel tests, the `1b` preset
# (bf16, batch 8 × 512) for lorakit and PyTorch + PEFT (eager, torch.compile, gradient
# checkpointing), each pair in this one call on this card, and an end-to-end `lorakit train` +
# `merge` of the tiny example on CUDA checked against PEFT. Results go to $OUT (or ./gpu-out).
#   [PARTS="kernels lorakit peft ops e2e lorakit-ckpt peft-ckpt peft-compile"] bash benches/gpu/run.sh [STEPS]
# Every part has its own time limit, so one slow or hanging part does not cost the others.
# $OUT gets summary.txt and results.tgz (every part's output; the device tool returns few files).
# `ops` runs benches/op_profile.rs (time per op at the 1b shapes). A bench binary carried as
# devbin/train_throughput_before(.xz) also runs, as `lorakit-before`: an A/B on the same card.
set -uo pipefail
cd "$(dirname "$0")/../.."
final="${OUT:-gpu-out}"; mkdir -p "$final"
out=$(mktemp -d)
steps="${1:-10}"
parts="${PARTS:-kernels lorakit lorakit-before peft ops e2e lorakit-ckpt peft-ckpt peft-compile}"
[ -f devbin/device-env.sh ] && source devbin/device-env.sh
for f in devbin/*.xz; do xz -dkf "$f"; done
chmod +x devbin/* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
has() { [[ " $parts " == *" $1 "* ]]; }
timed() { # NAME LIMIT_S CMD...: stdout to NAME.json, stderr to NAME.err, seconds to times.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name exit $? in $((SECONDS - t0)) s" | tee -a "$out/times.txt"
  summarize
}
summarize() { # the table so far, into $out and $final (a run cut short still reports)
  python3 - "$out" > "$out/summary.txt" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(n):
    try:
        return json.loads((out / (n + ".json")).read_text().strip().splitlines()[-1])
    except Exception as e:
        return {"error": str(e)}
rows = {n: load(n) for n in ["lorakit", "lorakit-before", "lorakit-ckpt", "peft", "peft-compile", "peft-ckpt"]}
for n, r in rows.items():
    if "tokens_per_s" in r:
        print(f"{n:14s} {r['tokens_per_s']:9.0f} tok/s  {r['ms_per_step']:8.1f} ms/step  peak {r['peak_bytes'] / 2**30:6.2f} GiB  cold start {r['cold_start_s']:.1f} s  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}  {r.get('phase_ms', '')}")
    else:
        print(f"{n:14s} {r}")
def ratio(a, b):
    if "tokens_per_s" in rows[a] and "tokens_per_s" in rows[b]:
        print(f"{a} / {b}: {rows[a]['tokens_per_s'] / rows[b]['tokens_per_s']:.2f}x tokens/s, {rows[a]['peak_bytes'] / rows[b]['peak_bytes']:.2f}x peak memory")
ratio("lorakit", "peft"); ratio("lorakit", "peft-compile"); ratio("lorakit-ckpt", "peft-ckpt")
ratio("lorakit", "lorakit-before")
PY
  cp "$out/summary.txt" "$final/"
}
args=(1b 8 512 "$steps" --device cuda --dtype bf16)
# the baselines right after lorakit, torch.compile early: a run cut short keeps the main ratios
if has kernels; then timed cuda_kernels 120 ./devbin/cuda_kernels --test-threads 1; fi
if has lorakit; then timed lorakit 150 ./devbin/train_throughput "${args[@]}"; fi
if has peft; then timed peft 150 python3 benches/train_throughput_peft.py "${args[@]}"; fi
if has peft-compile; then timed peft-compile 240 python3 benches/train_throughput_peft.py "${args[@]}" --compile; fi
if has lorakit-before && [ -x devbin/train_throughput_before ]; then
  timed lorakit-before 150 ./devbin/train_throughput_before "${args[@]}"
fi
if has lorakit-ckpt; then timed lorakit-ckpt 150 ./devbin/train_throughput "${args[@]}" --checkpointing; fi
if has peft-ckpt; then timed peft-ckpt 150 python3 benches/train_throughput_peft.py "${args[@]}" --checkpointing; fi
if has ops; then timed ops 120 ./devbin/op_profile --device cuda --dtype bf16; fi
if has e2e; then timed e2e 150 bash benches/gpu/e2e.sh "$out"; fi
summarize
cat "$out/ops.json" "$out/summary.txt" 2>/dev/null
tar czf "$final/results.tgz" -C "$out" .
tail -n 5 "$out"/*.err "$out/cuda_kernels.json" 2>/dev/null | tail -n 60
