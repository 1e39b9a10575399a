"""PyTorch's attention at the shapes of benches/attention_scaling.rs on the GPU, the reference for
its `--device cuda` rows: one causal row of SEQ tokens, bf16, H query heads over KV heads of D,
forward and forward + backward (q, k, v gradients), median of 5 timed calls after a warm-up, the
GPU synchronised after each (as the Rust bench does). Two variants: `sdpa` (PyTorch's default
choice of backend, kv heads read by `enable_gqa`) and `flash` (the FlashAttention-2 backend
forced, kv heads repeated first, as transformers does when it cannot pass them grouped).

    python benches/gpu/attention_sdpa.py [--heads=32/4] [--head-dim=64] [SEQ ...]

Versions of the recorded runs: torch 2.11.0 (cu130). One JSON line per length.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_s(f, reps=5):
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    args = sys.argv[1:]
    heads, kv = 32, 4
    d = 64
    for a in args:
        if a.startswith("--heads="):
            heads, kv = (int(x) for x in a.split("=", 1)[1].split("/"))
        if a.startswith("--head-dim="):
            d = int(a.split("=", 1)[1])
    lengths = [int(a) for a in args if a.isdigit()] or [1024, 2048, 4096, 8192]
    dev = torch.device("cuda")
    for s in lengths:
        torch.manual_seed(0)
        q = torch.randn(1, heads, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, kv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, kv, s, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(1, heads, s, d, device=dev, dtype=torch.bfloat16)
        row = {"seq": s, "heads": heads, "kv_heads": kv, "head_dim": d, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name()}

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def flash():
            rep = heads // kv
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(
                    q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)

        for name, f in (("sdpa", sdpa), ("flash", flash)):
            def both():
                (f() * up).sum().backward()
                q.grad = k.grad = v.grad = None
            try:
                with torch.no_grad():
                    row[f"{name}_fwd_ms"] = median_s(f) * 1e3
                row[f"{name}_fwd_bwd_ms"] = median_s(both) * 1e3
            except Exception as e:  # a backend that refuses these shapes
                row[f"{name}_error"] = str(e).splitlines()[0]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
