#!/usr/bin/env bash
# Sample packing on the real task: the SmolLM2 sentiment recipe (recipes/smollm2-sentiment.yaml,
# the quickstart's) trained for one epoch over the same first N training reviews (default 384)
# without packing (batch 8 examples) and with `data.packing: true` (batch 3 rows of up to 160
# tokens: about as many examples per step), one after the other in one command; then wall time,
# median tokens/s over the logged steps (real tokens, never padding) and examples/s, the padding share each run
# reports, eval loss and held-out test accuracy (200 reviews). Needs the quickstart's model and
# data (bash scripts/fetch-real.sh) and a release build.
#   bash benches/packing_sentiment.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-384}
cargo build --release --quiet --bin lorakit
lk=target/release/lorakit
cache=$(bash scripts/fetch-real.sh)
gguf="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
test_data="$cache/sentiment/test.chat.jsonl"
out=runs/packing
mkdir -p "$out"
head -n "$n" "$cache/sentiment/train.chat.jsonl" > "$out/train.jsonl"
rows=()
for spec in "unpacked:data.packing=false:8" "packed:data.packing=true:3"; do
  IFS=: read -r name packing batch <<< "$spec"
  t0=$(date +%s.%N)
  $lk train recipes/smollm2-sentiment.yaml --force --set "output.dir=$out/$name" \
    --set "data.train=$out/train.jsonl" --set "$packing" --set "train.batch_size=$batch" \
    --set train.max_steps=null --set train.epochs=1 --set train.eval_every=null > "$out/$name.log"
  t1=$(date +%s.%N)
  acc=$($lk eval --model "$gguf" --adapter "$out/$name/adapter" --data "$test_data" --format chat \
        --labels positive,negative --json | python3 -c 'import json,sys; print("%.1f" % (100 * json.load(sys.stdin)["accuracy"]))')
  figures=$(python3 - "$out/$name/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r for r in rows if "tokens_per_s" in r]
tps = statistics.median(r["tokens_per_s"] for r in steps)
eps = statistics.median(r["examples_per_s"] for r in steps)
print("%d %.0f %.1f %.4f" % (steps[-1]["step"], tps, eps, [r for r in rows if "eval_loss" in r][-1]["eval_loss"]))
PY
)
  read -r steps tps eps eval_loss <<< "$figures"
  padding=$(grep -o 'padding: [0-9.]*%' "$out/$name.log" | tail -1 | grep -o '[0-9.]*%')
  rows+=("$(printf '%-9s %6s %9.0f %9s %9s %8s %10s %9s' "$name" "$steps" "$(python3 -c "print($t1 - $t0)")" "$tps" "$eps" "$padding" "$eval_loss" "$acc%")")
  echo "${rows[-1]}"
done
echo
echo "SmolLM2-135M-Instruct Q4_1, one epoch over $n training reviews, 200 test reviews"
printf '%-9s %6s %9s %9s %9s %8s %10s %9s\n' run steps "wall (s)" "tok/s" "ex/s" padding "eval loss" accuracy
printf '%s\n' "${rows[@]}"
