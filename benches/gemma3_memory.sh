#!/usr/bin/env bash
# Peak memory of training Gemma 3 270M (the Q4_K_M GGUF from scripts/fetch-real.sh; a 262,144-token
# vocabulary is most of its parameters) at BATCH rows of SEQ tokens on CPU: lorakit vs PyTorch +
# PEFT on the same GGUF, one after the other in this command. Both: f32, LoRA r 8 on all seven
# projections, loss on every token, STEPS steps. lorakit reads rows of exactly SEQ tokens
# (reviews concatenated, truncated); PyTorch random ids of the same shape.
#   bash benches/gemma3_memory.sh [BATCH SEQ STEPS]      (default 8 128 4)
# PYTHON picks the interpreter with torch, transformers, peft and gguf (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-8} seq=${2:-128} steps=${3:-4}
cache=$(bash scripts/fetch-real.sh)
gguf="$cache/gemma3/gemma-3-270m-q4_k_m.gguf"
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
cat > "$work/recipe.yaml" <<YAML
model: {path: $gguf, dtype: f32}
data: {train: $work/rows.jsonl, format: completion, max_seq_len: $seq}
lora: {r: 8, lora_alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}
train: {max_steps: $steps, batch_size: $batch, learning_rate: 1.0e-4, log_every: 1}
output: {dir: $work/run}
YAML
peak() { awk '/Maximum resident set size/ {printf "%d", $6 * 1024}' "$1"; }
/usr/bin/time -v target/release/lorakit train "$work/recipe.yaml" > "$work/lorakit.log" 2> "$work/lorakit.time" \
  || { cat "$work/lorakit.log" "$work/lorakit.time"; exit 1; }
ours_peak=$(peak "$work/lorakit.time")
ours_tps=$(python3 -c 'import json,statistics,sys; v=[r["tokens_per_s"] for r in map(json.loads, open(sys.argv[1])) if r.get("tokens_per_s")][1:]; print("%.0f" % statistics.median(v))' "$work/run/metrics.jsonl")
theirs=$("${PYTHON:-python3}" benches/gemma3_memory_peft.py "$(dirname "$gguf")" "$(basename "$gguf")" "$batch" "$seq" "$steps" 2>/dev/null | tail -1)
python3 - "$ours_peak" "$ours_tps" "$theirs" "$batch" "$seq" <<'PY'
import json, sys
ours_peak, ours_tps, theirs = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
b, s = sys.argv[4], sys.argv[5]
mib = lambda x: x / 2**20
print(f"Gemma 3 270M (Q4_K_M GGUF, f32 compute), LoRA r 8 all projections, batch {b}x{s}, CPU:")
print(f"  peak RSS   lorakit {mib(ours_peak):.0f} MiB  pytorch+peft {mib(theirs['peak_rss_bytes']):.0f} MiB  ratio {ours_peak / theirs['peak_rss_bytes']:.2f}x")
print(f"  tokens/s   lorakit {ours_tps:.0f}  pytorch+peft {theirs['tokens_per_s']:.0f}  ratio {ours_tps / theirs['tokens_per_s']:.2f}x (median step after the first)")
PY
