#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry devbin/ made by benches/gpu/prepare.sh): the
# tensor-core attention's CUDA test, the attention core alone against the blocked attention and
# PyTorch's SDPA (flash), and a `1b` training step (bf16) at 1 × SEQ tokens for lorakit with the
# tensor-core attention, lorakit with the blocked attention (LORAKIT_ATTENTION=blocks) and
# PyTorch + PEFT (SDPA), with and without activation checkpointing — every row on this card in
# this one call. Results go to $OUT (or ./gpu-out): summary.txt and results.tgz.
#   [PARTS="test core sdpa core128 sdpa128 lorakit peft blocks lorakit-ckpt peft-ckpt"] bash benches/gpu/long_rows.sh [SEQ] [STEPS]
set -uo pipefail
cd "$(dirname "$0")/../.."
final="${OUT:-gpu-out}"; mkdir -p "$final"
out=$(mktemp -d)
seq="${1:-8192}"; steps="${2:-3}"
parts="${PARTS:-test core sdpa core128 sdpa128 lorakit peft blocks lorakit-ckpt peft-ckpt}"
[ -f devbin/device-env.sh ] && source devbin/device-env.sh
for f in devbin/*.xz; do [ -e "${f%.xz}" ] || xz -dkf "$f"; done
chmod +x devbin/* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
has() { [[ " $parts " == *" $1 "* ]]; }
timed() { # NAME LIMIT_S CMD...: stdout to NAME.json, stderr to NAME.err
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.json" 2> "$out/$name.err"
  echo "$name exit $? in $((SECONDS - t0)) s" | tee -a "$out/times.txt"
  summarize
}
summarize() {
  python3 - "$out" > "$out/summary.txt" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print((out / "gpu.txt").read_text().strip())
print((out / "times.txt").read_text().strip() if (out / "times.txt").exists() else "")
def lines(n):
    p = out / (n + ".json")
    return [json.loads(l) for l in p.read_text().splitlines() if l.startswith("{")] if p.exists() else []
for tag, cn, sn in [("", "core", "sdpa"), (" heads 32/8 of 128", "core128", "sdpa128")]:
  core = {r["seq"]: r for r in lines(cn)}
  sdpa = {r["seq"]: r for r in lines(sn)}
  for s in sorted(set(core) | set(sdpa)):
    c, p = core.get(s, {}), sdpa.get(s, {})
    f = lambda x: "-" if x is None else f"{x:.2f}"
    print(f"attention{tag} 1x{s}: fwd ms tensor-core {f(c.get('tiled_fwd_ms'))} blocks {f(c.get('blocks_fwd_ms'))} "
          f"sdpa {f(p.get('sdpa_fwd_ms'))} flash {f(p.get('flash_fwd_ms'))} | fwd+bwd ms tensor-core "
          f"{f(c.get('tiled_fwd_bwd_ms'))} blocks {f(c.get('blocks_fwd_bwd_ms'))} sdpa {f(p.get('sdpa_fwd_bwd_ms'))} "
          f"flash {f(p.get('flash_fwd_bwd_ms'))}")
def last(n):
    l = lines(n)
    return l[-1] if l else {}
rows = {n: last(n) for n in ["lorakit", "blocks", "peft", "lorakit-ckpt", "peft-ckpt"]}
for n, r in rows.items():
    if "tokens_per_s" in r:
        print(f"{n:13s} {r['tokens_per_s']:9.0f} tok/s {r['ms_per_step']:9.1f} ms/step  peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
              f"cold start {r['cold_start_s']:.1f} s  loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
for a, b in [("lorakit", "peft"), ("blocks", "peft"), ("lorakit", "blocks"), ("lorakit-ckpt", "peft-ckpt")]:
    if "tokens_per_s" in rows[a] and "tokens_per_s" in rows[b]:
        print(f"{a} / {b}: {rows[a]['tokens_per_s'] / rows[b]['tokens_per_s']:.2f}x tokens/s, "
              f"{rows[a]['peak_bytes'] / rows[b]['peak_bytes']:.2f}x peak memory")
PY
  cp "$out/summary.txt" "$final/"
}
args=(1b 1 "$seq" "$steps" --device cuda --dtype bf16)
if has test; then timed test 150 ./devbin/cuda_kernels --test-threads 1; fi
if has core; then timed core 120 ./devbin/attention_scaling --device cuda --heads=32/4 1024 2048 4096 "$seq"; fi
if has sdpa; then timed sdpa 90 python3 benches/gpu/attention_sdpa.py --heads=32/4 1024 2048 4096 "$seq"; fi
# heads of 128 (Llama 3 8B's 32/8)
if has core128; then timed core128 60 ./devbin/attention_scaling --device cuda --heads=32/8 --head-dim=128 "$seq"; fi
if has sdpa128; then timed sdpa128 60 python3 benches/gpu/attention_sdpa.py --heads=32/8 --head-dim=128 "$seq"; fi
if has lorakit; then timed lorakit 120 ./devbin/train_throughput "${args[@]}"; fi
if has peft; then timed peft 120 python3 benches/train_throughput_peft.py "${args[@]}"; fi
if has blocks; then LORAKIT_ATTENTION=blocks timed blocks 120 ./devbin/train_throughput "${args[@]}"; fi
if has lorakit-ckpt; then timed lorakit-ckpt 120 ./devbin/train_throughput "${args[@]}" --checkpointing; fi
if has peft-ckpt; then timed peft-ckpt 120 python3 benches/train_throughput_peft.py "${args[@]}" --checkpointing; fi
summarize
tar czf "$final/results.tgz" -C "$out" .
cat "$out/summary.txt"
tail -n 30 "$out/test.json" 2>/dev/null | grep -E "test |panicked|differ|result" | head -40
tail -n 3 "$out"/*.err 2>/dev/null | tail -n 40
