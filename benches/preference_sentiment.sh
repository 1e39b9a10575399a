#!/usr/bin/env bash
# Preference tuning on the real task: DPO on SmolLM2-135M-Instruct (the quickstart's GGUF) instead
# of SFT. Pairs come from the quickstart's VADER splits: the prompt is the review conversation,
# the chosen answer the correct sentiment label, the rejected one the wrong label. Reports, before
# and after training, on the 200 held-out test reviews: label accuracy (`lorakit eval --labels`),
# the share of test pairs whose chosen answer the model finds more likely per token (`eval
# --format preference --objective orpo`'s reward accuracy: it needs no reference), and after
# training DPO's own held-out reward accuracy and margin. Then the cost of the reference: the
# same short run with its log-probabilities precomputed once per pair and computed in every step.
# Needs the quickstart's model and data (bash scripts/fetch-real.sh) and a release build.
#   bash benches/preference_sentiment.sh [TRAIN_PAIRS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-256}
steps=${2:-32}
cargo build --release --quiet --bin lorakit
lk=target/release/lorakit
cache=$(bash scripts/fetch-real.sh)
gguf="$cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
data="$cache/sentiment"
out=runs/preference
mkdir -p "$out"
python3 - "$data" "$out" "$n" <<'PY'
import json, sys
data, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def pairs(src, dst, limit):
    with open(src) as f, open(dst + ".tmp", "w") as g:
        for i, line in enumerate(f):
            if i == limit:
                break
            m = json.loads(line)["messages"]
            label = m[-1]["content"]
            wrong = "negative" if label == "positive" else "positive"
            g.write(json.dumps({"messages": m[:-1], "chosen": [{"role": "assistant", "content": label}],
                                "rejected": [{"role": "assistant", "content": wrong}]}) + "\n")
    import os; os.replace(dst + ".tmp", dst)
pairs(f"{data}/train.chat.jsonl", f"{out}/pairs-train.jsonl", n)
pairs(f"{data}/eval.chat.jsonl", f"{out}/pairs-eval.jsonl", 10**9)
pairs(f"{data}/test.chat.jsonl", f"{out}/pairs-test.jsonl", 10**9)
PY
field() { python3 -c "import json,sys; print('%.${2:-1}f' % (${3:-100} * json.load(sys.stdin)['$1']))"; }
labels() { $lk eval --model "$gguf" "$@" --data "$data/test.chat.jsonl" --format chat --labels positive,negative --json | field accuracy; }
pairs_eval() { $lk eval --model "$gguf" "$@" --data "$out/pairs-test.jsonl" --format preference --max-seq-len 160 --json; }

echo "== before"
before_labels=$(labels)
before_pref=$(pairs_eval --objective orpo | field reward_accuracy)
echo "   label accuracy $before_labels%, chosen more likely in $before_pref% of test pairs"

echo "== DPO, $n pairs, $steps steps"
train() {
  $lk train recipes/smollm2-sentiment.yaml --force --set "output.dir=$out/$1" \
    --set data.format=preference --set "data.train=$out/pairs-train.jsonl" \
    --set "data.eval=$out/pairs-eval.jsonl" --set train.objective=dpo \
    --set train.learning_rate=5.0e-4 --set "train.max_steps=$2" --set "train.eval_every=$2" \
    "${@:3}" > "$out/$1.log"
}
t0=$(date +%s.%N)
train dpo "$steps"
t1=$(date +%s.%N)
after_labels=$(labels --adapter "$out/dpo/adapter")
after_pref=$(pairs_eval --adapter "$out/dpo/adapter" --objective orpo | field reward_accuracy)
dpo_json=$(pairs_eval --adapter "$out/dpo/adapter" --objective dpo)
dpo_acc=$(echo "$dpo_json" | field reward_accuracy)
dpo_margin=$(echo "$dpo_json" | field reward_margin 3 1)

echo "== the reference: precomputed once vs every step (8 steps each)"
secs_per_step() { python3 -c "import re,sys; t=open(sys.argv[1]).read(); print(re.search(r'done: (\d+) steps in ([0-9.]+) s', t).group(2))" "$1"; }
train ref-pre 8 --set train.eval_every=1000 --set train.reference_logps=precomputed
train ref-per 8 --set train.eval_every=1000 --set train.reference_logps=per_step
pre=$(secs_per_step "$out/ref-pre.log")
per=$(secs_per_step "$out/ref-per.log")
precompute=$(grep -o 'reference log-probabilities of [0-9]* pairs (adapters off) in [0-9.]* s' "$out/ref-pre.log" | grep -o '[0-9.]* s$')

echo
echo "SmolLM2-135M-Instruct Q4_1, DPO (beta 0.1, lr 5e-4) on $n VADER pairs, $steps steps ($(python3 -c "print('%.0f' % ($t1 - $t0))") s); 200 test reviews"
printf '%-8s %16s %26s %24s %14s\n' "" "label accuracy" "chosen more likely (pairs)" "DPO reward accuracy" "DPO margin"
printf '%-8s %16s %26s %24s %14s\n' before "$before_labels%" "$before_pref%" "— (0 by definition)" "0"
printf '%-8s %16s %26s %24s %14s\n' after "$after_labels%" "$after_pref%" "$dpo_acc%" "$dpo_margin"
echo
echo "reference log-probabilities, 8-step runs: precomputed $pre s in all (of which the pass over $n pairs: $precompute), per step $per s"
