#!/usr/bin/env bash
# What DoRA costs on top of LoRA, one command, same machine: lorakit LoRA, lorakit DoRA and
# PyTorch + PEFT DoRA (and PEFT LoRA for reference) on the train_throughput recipe.
#   bash benches/dora_cost.sh [PRESET BATCH SEQ STEPS] [--device cpu|cuda] [--dtype f32|bf16]
# (default: small 2 128 20). PYTHON picks the interpreter with torch, transformers and peft.
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(small 2 128 20)
cargo bench --quiet --bench train_throughput --no-run 2>/dev/null || cargo bench --bench train_throughput --no-run
py=${PYTHON:-python3}
lora=$(cargo bench --quiet --bench train_throughput -- "${args[@]}" | tail -1)
dora=$(cargo bench --quiet --bench train_throughput -- "${args[@]}" --dora | tail -1)
peft_dora=$("$py" benches/train_throughput_peft.py "${args[@]}" --dora | tail -1)
peft_lora=$("$py" benches/train_throughput_peft.py "${args[@]}" | tail -1)
python3 - "$lora" "$dora" "$peft_dora" "$peft_lora" <<'PY'
import json, sys
lora, dora, peft_dora, peft_lora = (json.loads(s) for s in sys.argv[1:])
print(f"{lora['preset']} batch {lora['batch']}x{lora['seq']} on {lora['device']} ({lora['dtype']}):")
for r in (lora, dora, peft_dora, peft_lora):
    print(f"  {r['impl']:<22} {r['tokens_per_s']:7.0f} tokens/s  {r['ms_per_step']:7.1f} ms/step")
print(f"  DoRA / LoRA, lorakit:      {dora['tokens_per_s'] / lora['tokens_per_s']:.2f}x tokens/s")
print(f"  DoRA / LoRA, PyTorch+PEFT: {peft_dora['tokens_per_s'] / peft_lora['tokens_per_s']:.2f}x tokens/s")
print(f"  lorakit DoRA / PEFT DoRA:  {dora['tokens_per_s'] / peft_dora['tokens_per_s']:.2f}x tokens/s")
PY
