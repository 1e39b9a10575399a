#!/usr/bin/env bash
# One command, both implementations, same machine, same run: lorakit vs PyTorch + PEFT.
#   bash benches/train_throughput.sh PRESET [BATCH SEQ STEPS] [--device cpu|cuda] [--dtype f32|bf16]
#       [--checkpointing] (both sides) [--full-logits] (lorakit's unchunked loss)
# PYTHON picks the interpreter with torch, transformers and peft (default python3).
# REPEAT=N (default 1) alternates N runs of each and reports per-pair ratios and their median:
# on a shared machine one pair can be off by ±15 %.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --quiet --bench train_throughput --no-run 2>/dev/null || cargo bench --bench train_throughput --no-run
results=()
for _ in $(seq "${REPEAT:-1}"); do
  ours=$(cargo bench --quiet --bench train_throughput -- "$@" | tail -1)
  theirs=$("${PYTHON:-python3}" benches/train_throughput_peft.py "$@" | tail -1)
  echo "$ours"
  echo "$theirs"
  results+=("$ours" "$theirs")
done
python3 - "${results[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(s) for s in sys.argv[1:]]
pairs = list(zip(runs[0::2], runs[1::2]))
a, b = pairs[-1]
print(f"{a['preset']} batch {a['batch']}x{a['seq']} on {a['device']} ({a['dtype']}), {len(pairs)} run(s) of each:")
for a, b in pairs:
    print(f"  tokens/s     lorakit {a['tokens_per_s']:.0f}  {b['impl']} {b['tokens_per_s']:.0f}  ratio {a['tokens_per_s'] / b['tokens_per_s']:.2f}x"
          f"   ms/step {a['ms_per_step']:.1f} / {b['ms_per_step']:.1f}")
if len(pairs) > 1:
    ratios = [x['tokens_per_s'] / y['tokens_per_s'] for x, y in pairs]
    print(f"  median ratio {statistics.median(ratios):.2f}x (min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
if a.get("peak_bytes") and b.get("peak_bytes"):
    print(f"  peak memory  lorakit {a['peak_bytes'] / 2**20:.0f} MiB  {b['impl']} {b['peak_bytes'] / 2**20:.0f} MiB  ratio {a['peak_bytes'] / b['peak_bytes']:.2f}x ({a['peak_kind']})")
if a.get("peak_heap_bytes"):
    print(f"  lorakit heap peak {a['peak_heap_bytes'] / 2**20:.0f} MiB (live allocations); step phases ms "
          + ", ".join(f"{k} {v:.0f}" for k, v in a['phase_ms'].items()))
print(f"  cold start   lorakit {a['cold_start_s']:.1f} s  {b['impl']} {b['cold_start_s']:.1f} s (launch to first finished step)")
PY
