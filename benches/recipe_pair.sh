#!/usr/bin/env bash
# Two lorakit binaries on one recipe, alternating in one run on the same machine: median
# training tokens/s of each (steps after the first two), and their ratio. For a change's before
# and after, e.g. MiniLM (BERT) on the sentiment task:
#   bash benches/recipe_pair.sh OLD_BIN NEW_BIN recipes/minilm-sentiment.yaml [STEPS] [REPEAT]
# The recipe runs without its eval data, for STEPS (default 20) steps, into a temporary dir.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1 new=$2 recipe=$3 steps=${4:-20} repeat=${5:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$recipe" "$tmp" "$steps" <<'PY'
import sys, yaml
recipe, tmp, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = yaml.safe_load(open(recipe))
r["data"].pop("eval", None); r["data"].pop("eval_split", None)
r["train"].update(max_steps=steps, log_every=1); r["train"].pop("eval_every", None)
r["output"]["dir"] = tmp + "/out"
yaml.safe_dump(r, open(tmp + "/recipe.yaml", "w"))
PY
run() {
  rm -rf "$tmp/out"
  RUST_BACKTRACE=0 "$1" train "$tmp/recipe.yaml" >/dev/null 2>&1
  python3 -c 'import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(statistics.median([x["tokens_per_s"] for x in r if x.get("tokens_per_s") and x["step"]>2]))' "$tmp/out/metrics.jsonl"
}
ratios=()
for i in $(seq "$repeat"); do
  a=$(run "$old"); b=$(run "$new")
  r=$(python3 -c "print(f'{$b/$a:.3f}')")
  ratios+=("$r")
  printf 'pair %d: old %.0f tok/s  new %.0f tok/s  new/old %s\n' "$i" "$a" "$b" "$r"
done
python3 -c "import statistics,sys; print('median new/old', statistics.median(float(x) for x in sys.argv[1:]))" "${ratios[@]}"
