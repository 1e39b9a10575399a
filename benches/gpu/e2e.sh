#!/usr/bin/env bash
# Device side, called by run.sh: trains the tiny example on CUDA with the `lorakit` binary,
# merges the adapter, and checks the merged model against PEFT applying the adapter (PyTorch).
#   [LORAKIT=path] [DEVICE=cuda] bash benches/gpu/e2e.sh OUT_DIR   (the run's metrics land there)
set -euo pipefail
out=$1
run=$(mktemp -d)
lk=${LORAKIT:-./devbin/lorakit}
"$lk" train recipes/tiny-completion.yaml --set "model.device=${DEVICE:-cuda}" \
  --set "output.dir=$run/tiny" --force
cp "$run/tiny/metrics.jsonl" "$out/e2e-metrics.jsonl"
"$lk" merge --base examples/tiny-llama --adapter "$run/tiny/adapter" \
  --out /tmp/tiny-merged --force --verify
python3 - "$run/tiny/adapter" /tmp/tiny-merged <<'PY'
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, merged = sys.argv[1:]
ids = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 64, 11, 2]])
base = AutoModelForCausalLM.from_pretrained("examples/tiny-llama", dtype=torch.float32)
with torch.no_grad():
    plain = base(ids).logits
peft = PeftModel.from_pretrained(base, adapter).eval()
ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
with torch.no_grad():
    a, b = peft(ids).logits, ours(ids).logits
print(json.dumps({"peft_vs_lorakit_merged_max_abs_diff": (a - b).abs().max().item(),
                  "adapter_effect_max_abs": (a - plain).abs().max().item()}))
PY
