"""Baseline for benches/train_throughput.rs: PyTorch + transformers + PEFT on the same recipe —
random-initialised Llama of the preset's shape, LoRA r 16 / alpha 32 on q,k,v,o,gate,up,down,
AdamW lr 2e-4 over the adapter (f32), loss on every position. Prints one JSON line.

    python benches/train_throughput_peft.py PRESET [BATCH SEQ STEPS] [--device cpu|cuda] [--dtype f32|bf16] [--compile] [--checkpointing] [--dora]

Versions used for the issue's anchor: torch 2.11.0, transformers 5.17.0, peft 0.21.0
(`pip install torch transformers peft`). Threads: torch's default (all cores).
"""
import json
import resource
import sys
import time

LAUNCH = time.time()
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

PRESETS = {
    "tiny": (64, 2, 4, 2, 128, 384),
    "small": (512, 8, 8, 4, 1408, 32000),
    "1b": (2048, 22, 32, 4, 5632, 32000),
}


def main():
    args = [a for a in sys.argv[1:]]
    flags = {}
    for f in ("--device", "--dtype"):
        if f in args:
            i = args.index(f)
            flags[f] = args[i + 1]
            del args[i : i + 2]
    compile_ = "--compile" in args
    checkpointing = "--checkpointing" in args
    dora = "--dora" in args
    # --full-logits selects lorakit's unchunked loss; transformers always builds full logits
    args = [a for a in args if a not in ("--compile", "--checkpointing", "--full-logits", "--dora")]
    name = args[0] if args else "small"
    batch, seq, steps = [int(x) for x in (args[1:4] + ["2", "128", "5"][len(args[1:4]):])]
    h, layers, heads, kv, inter, vocab = PRESETS[name]
    device = flags.get("--device", "cpu")
    dtype = torch.bfloat16 if flags.get("--dtype") == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(seq, 2048),
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      use_dora=dora)
    model = get_peft_model(model, lcfg)
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    if compile_:
        model = torch.compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ids = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    setup = time.time() - LAUNCH
    first = step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cold = time.time() - LAUNCH
    t = time.time()
    last = first
    for _ in range(steps):
        last = step()
    if device == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "impl": "pytorch+peft" + ("+compile" if compile_ else "") + ("+checkpointing" if checkpointing else "") + ("+dora" if dora else ""), "preset": name, "batch": batch, "seq": seq,
        "steps": steps, "device": device, "dtype": str(dtype).replace("torch.", ""),
        "trainable_params": sum(p.numel() for p in params),
        "tokens_per_s": batch * seq * steps / secs, "ms_per_step": 1e3 * secs / steps,
        "peak_bytes": peak, "peak_kind": "GPU allocated" if device == "cuda" else "process peak RSS",
        "cold_start_s": cold, "setup_s": setup, "first_loss": first, "last_loss": last,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__},
    }))


if __name__ == "__main__":
    main()
