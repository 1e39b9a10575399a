#!/usr/bin/env bash
# One command, both implementations, same machine, same run: lorakit vs PyTorch + PEFT.
#   bash benches/train_throughput.sh PRESET [BATCH SEQ STEPS] [--device cpu|cuda] [--dtype f32|bf16]
#       [--checkpointing] (both sides) [--full-logits] (lorakit's unchunked loss)
# PYTHON picks the interpreter with torch, transformers and peft (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ours=$(cargo bench --quiet --bench train_throughput -- "$@" | tail -1)
theirs=$("${PYTHON:-python3}" benches/train_throughput_peft.py "$@" | tail -1)
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{a['preset']} batch {a['batch']}x{a['seq']} on {a['device']} ({a['dtype']}):")
print(f"  tokens/s     lorakit {a['tokens_per_s']:.0f}  pytorch+peft {b['tokens_per_s']:.0f}  ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
print(f"  ms/step      lorakit {a['ms_per_step']:.1f}  pytorch+peft {b['ms_per_step']:.1f}")
if a.get("peak_bytes") and b.get("peak_bytes"):
    print(f"  peak memory  lorakit {a['peak_bytes'] / 2**20:.0f} MiB  pytorch+peft {b['peak_bytes'] / 2**20:.0f} MiB  ratio {a['peak_bytes'] / b['peak_bytes']:.2f}x ({a['peak_kind']})")
if a.get("peak_heap_bytes"):
    print(f"  lorakit heap peak {a['peak_heap_bytes'] / 2**20:.0f} MiB (live allocations); step phases ms {a['phase_ms']}")
print(f"  cold start   lorakit {a['cold_start_s']:.1f} s  pytorch+peft {b['cold_start_s']:.1f} s (launch to first finished step)")
PY
