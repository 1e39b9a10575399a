#!/usr/bin/env bash
# Peak memory and speed of training on a quantized GGUF base (QLoRA), on CPU, in one command:
# for SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M (Q4_K_M; its 262,144-token vocabulary is most
# of its parameters), both from scripts/fetch-real.sh, at BATCH rows of SEQ tokens:
#   lorakit, weights kept in their GGML blocks   (model.quantized: keep, the default)
#   lorakit, weights dequantized at load          (model.quantized: dequantize)
#   PyTorch + transformers + PEFT on the same GGUF (transformers dequantizes it to f32)
# each without and with gradient checkpointing (as QLoRA recipes run: PEFT's
# prepare_model_for_kbit_training turns it on). All: f32 compute, LoRA r 8 / alpha 16 on all seven
# projections, loss on every token, AdamW, STEPS steps, one process each, peak RSS from the kernel (GNU time / ru_maxrss), tokens/s the
# median step after the first. lorakit reads rows of exactly SEQ tokens (reviews concatenated,
# truncated); PyTorch random ids of the same shape.
#   bash benches/qlora_memory.sh [BATCH SEQ STEPS]      (default 8 128 4)
# PYTHON picks the interpreter with torch, transformers, peft and gguf (default python3); set
# SKIP_PYTORCH=1 to leave it out.
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-8} seq=${2:-128} steps=${3:-4}
cache=$(bash scripts/fetch-real.sh)
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# rows longer than SEQ tokens: eight reviews each
python3 - "$cache/sentiment/train.classification.jsonl" "$work/rows.jsonl" <<'PY'
import json, sys
texts = [json.loads(l)["text"] for l in open(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for i in range(0, 8 * 64, 8):
        f.write(json.dumps({"text": " ".join(texts[i:i + 8])}) + "\n")
PY
peak() { awk '/Maximum resident set size/ {printf "%.0f", $6 * 1024}' "$1"; }
median_tps() { python3 -c 'import json,statistics,sys; v=[r["tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s")][1:]; print("%.1f" % statistics.median(v))' "$1"; }
results="$work/results.jsonl"
for model in "SmolLM2-135M-Instruct Q4_1|$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
             "Gemma 3 270M Q4_K_M|$cache/gemma3/gemma-3-270m-q4_k_m.gguf"; do
  name=${model%%|*} gguf=${model#*|}
  for ckpt in false true; do
  for mode in keep dequantize; do
    run="$work/run-$(basename "$gguf" .gguf)-$mode-$ckpt"
    cat > "$work/recipe.yaml" <<YAML
model: {path: $gguf, dtype: f32, quantized: $mode}
data: {train: $work/rows.jsonl, format: completion, max_seq_len: $seq}
lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
train: {max_steps: $steps, batch_size: $batch, learning_rate: 1.0e-4, log_every: 1, gradient_checkpointing: $ckpt}
output: {dir: $run}
YAML
    /usr/bin/time -v target/release/lorakit train "$work/recipe.yaml" > "$work/lorakit.log" 2> "$work/lorakit.time" \
      || { cat "$work/lorakit.log" "$work/lorakit.time"; exit 1; }
    echo "{\"model\": \"$name\", \"ckpt\": $ckpt, \"impl\": \"lorakit $mode\", \"peak\": $(peak "$work/lorakit.time"), \"tps\": $(median_tps "$run/metrics.jsonl")}" >> "$results"
  done
  if [ -z "${SKIP_PYTORCH:-}" ]; then
    theirs=$(CHECKPOINTING=$([ $ckpt = true ] && echo 1 || echo 0) "${PYTHON:-python3}" benches/gguf_train_peft.py "$(dirname "$gguf")" "$(basename "$gguf")" "$batch" "$seq" "$steps" 2>/dev/null | tail -1)
    python3 -c 'import json,sys; t=json.loads(sys.argv[2]); print(json.dumps({"model": sys.argv[1], "ckpt": sys.argv[3] == "true", "impl": "pytorch+peft", "peak": t["peak_rss_bytes"], "tps": t["tokens_per_s"]}))' "$name" "$theirs" "$ckpt" >> "$results"
  fi
  done
done
python3 - "$results" "$batch" "$seq" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"Training on a quantized GGUF base, CPU, f32 compute, LoRA r 8 all projections, batch {sys.argv[2]}x{sys.argv[3]}:")
print(f"  {'model':28} {'checkpointing':13} {'run':20} {'peak RSS':>10} {'tokens/s':>9}   vs dequantize: memory  speed")
for r in rows:
    base = next(b for b in rows if b["model"] == r["model"] and b["ckpt"] == r["ckpt"] and b["impl"] == "lorakit dequantize")
    ck = "on" if r["ckpt"] else "off"
    print(f"  {r['model']:28} {ck:13} {r['impl']:20} {r['peak'] / 2**20:7.0f} MiB {r['tps']:9.1f}   {r['peak'] / base['peak']:19.2f}x {r['tps'] / base['tps']:5.2f}x")
PY
