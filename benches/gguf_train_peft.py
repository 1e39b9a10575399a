"""Baseline for benches/qlora_memory.sh: PyTorch + transformers + PEFT training a model from a GGUF
file (transformers dequantises it to f32), LoRA r 8 / alpha 16 on q,k,v,o,gate,up,down,
AdamW lr 1e-4 over the adapter, next-token loss on every position of BATCH rows of SEQ tokens
(random ids: memory and time do not depend on which tokens). Prints one JSON line with the peak
RSS (ru_maxrss) and tokens/s. CHECKPOINTING=1 in the environment turns on gradient checkpointing
(`gradient_checkpointing_enable`, non-reentrant, as PEFT's QLoRA recipes do).

    python benches/gguf_train_peft.py GGUF_DIR GGUF_FILE [BATCH SEQ STEPS]

Versions used: torch 2.11.0, transformers 5.17.0, peft 0.21.0, gguf 0.17.1.
"""
import json
import os
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    d, f = sys.argv[1], sys.argv[2]
    batch, seq, steps = [int(x) for x in (sys.argv[3:6] + ["8", "128", "4"][len(sys.argv[3:6]):])]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    checkpointing = os.environ.get("CHECKPOINTING") == "1"
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    times = []
    for _ in range(steps):
        t = time.time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t)
    ms = 1000 * sorted(times[1:])[len(times[1:]) // 2] if steps > 1 else 1000 * times[0]
    print(json.dumps({"impl": "pytorch+peft", "batch": batch, "seq": seq, "steps": steps,
                      "checkpointing": checkpointing,
                      "ms_per_step": ms, "tokens_per_s": batch * seq / (ms / 1000),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
