#!/usr/bin/env bash
# The LoRA variants on the real task: the SmolLM2 sentiment recipe (recipes/smollm2-sentiment.yaml,
# the quickstart's) trained the same number of steps with plain LoRA, DoRA, PiSSA, OLoRA and LoRA+,
# then held-out test accuracy (200 reviews) and training time for each, one after another in one
# command. Needs the quickstart's model and data (bash scripts/fetch-real.sh) and a release build.
#   bash benches/variants_sentiment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin lorakit
lk=target/release/lorakit
cache=$(bash scripts/fetch-real.sh)
gguf="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
test_data="$cache/sentiment/test.chat.jsonl"
out=runs/variants
mkdir -p "$out"
rows=()
for spec in "lora:" "dora:lora.use_dora=true" "pissa:lora.init_lora_weights=pissa" \
            "olora:lora.init_lora_weights=olora" "lora+:train.loraplus_lr_ratio=16"; do
  name=${spec%%:*}
  set_args=(--set "output.dir=$out/$name")
  [ -n "${spec#*:}" ] && set_args+=(--set "${spec#*:}")
  t0=$(date +%s.%N)
  $lk train recipes/smollm2-sentiment.yaml --force "${set_args[@]}" > "$out/$name.log"
  t1=$(date +%s.%N)
  acc=$($lk eval --model "$gguf" --adapter "$out/$name/adapter" --data "$test_data" --format chat \
        --labels positive,negative --json | python3 -c 'import json,sys; print("%.1f" % (100 * json.load(sys.stdin)["accuracy"]))')
  eval_loss=$(python3 -c 'import json,sys; print("%.4f" % [r for r in map(json.loads, open(sys.argv[1])) if "eval_loss" in r][-1]["eval_loss"])' "$out/$name/metrics.jsonl")
  rows+=("$(printf '%-6s %8s %10.0f %10s' "$name" "$acc%" "$(python3 -c "print($t1 - $t0)")" "$eval_loss")")
  echo "${rows[-1]}"
done
echo
echo "SmolLM2-135M-Instruct Q4_1, recipes/smollm2-sentiment.yaml (32 steps, batch 8), 200 test reviews"
printf '%-6s %8s %10s %10s\n' variant accuracy "train (s)" "eval loss"
printf '%s\n' "${rows[@]}"
