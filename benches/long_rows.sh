#!/usr/bin/env bash
# Long rows, one command: tokens/s, peak RSS and cold start of training at 1 × SEQ tokens for each
# SEQ, lorakit against PyTorch + transformers + PEFT (transformers' default attention, SDPA), each
# without and with gradient checkpointing, one process per run. Same recipe as
# benches/train_throughput.sh (random Llama of the preset, f32, LoRA r 16 on all seven projections,
# AdamW, loss on every position); tokens/s over STEPS steps after the first, peak RSS of the
# process, cold start = launch to the first finished step (of which: setup, launch to the first
# step's start: imports, random weights, model and adapter built).
#   bash benches/long_rows.sh [PRESET STEPS SEQ...]     (default: small 2 512 1024 2048 4096 8192)
# PYTHON picks the interpreter with torch, transformers and peft (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small} steps=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
lengths=("$@")
[ ${#lengths[@]} -gt 0 ] || lengths=(512 1024 2048 4096 8192)
export RUST_BACKTRACE=0
cargo bench --quiet --bench train_throughput --no-run 2>/dev/null || cargo bench --bench train_throughput --no-run
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for seq in "${lengths[@]}"; do
  for ckpt in "" --checkpointing; do
    cargo bench --quiet --bench train_throughput -- "$preset" 1 "$seq" "$steps" $ckpt | tail -1 >> "$results"
    "${PYTHON:-python3}" benches/train_throughput_peft.py "$preset" 1 "$seq" "$steps" $ckpt | tail -1 >> "$results"
    tail -2 "$results" >&2
  done
done
python3 - "$results" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print(f"{runs[0]['preset']}, batch 1, {runs[0]['device']} {runs[0]['dtype']}; lorakit / PyTorch + PEFT (SDPA)")
print("| tokens | checkpointing | tokens/s lorakit | tokens/s PyTorch | ratio | peak RSS lorakit | peak RSS PyTorch | ratio | cold start (setup) lorakit | cold start (setup) PyTorch |")
print("|---|---|---|---|---|---|---|---|---|---|")
for ours, theirs in zip(runs[0::2], runs[1::2]):
    ckpt = "on" if "checkpointing" in theirs["impl"] else "off"
    mib = lambda r: r["peak_bytes"] / 2**20
    print(f"| 1 × {ours['seq']} | {ckpt} | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
          f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}× | {mib(ours):.0f} MiB | {mib(theirs):.0f} MiB | "
          f"{mib(ours) / mib(theirs):.2f}× | {ours['cold_start_s']:.1f} s ({ours['setup_s']:.1f}) | "
          f"{theirs['cold_start_s']:.1f} s ({theirs['setup_s']:.1f}) |")
PY
