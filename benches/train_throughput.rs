//! Training throughput of lorakit on a randomly initialised Llama, the same recipe as
//! `benches/train_throughput_peft.py` (PyTorch + transformers + PEFT): LoRA r 16, α 32 on
//! q,k,v,o,gate,up,down, AdamW lr 2e-4, adapters and optimizer state in f32, loss on every
//! position. Prints tokens/s, ms/step, peak memory and the time from launch to the first
//! finished step as one JSON line. Numbers are reported, never asserted.
//! `benches/train_throughput.sh` runs both and prints the ratio.
//!
//!   cargo bench --bench train_throughput -- PRESET [BATCH SEQ STEPS] [--device cpu|cuda] [--dtype f32|bf16]
//!       [--checkpointing] (activation checkpointing) [--full-logits] (unchunked output head)
//!       [--dora] (DoRA adapters)
//!   presets: tiny (hidden 64, 2 layers), small (hidden 512, 8 layers, 8/4 heads, vocab 32000),
//!            1b (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32/4 heads, 5632, vocab 32000)
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit_adapter::{Adapters, LoraConfig, ModuleSpec};
use lorakit_models::{build_causal_lm, registry};
use lorakit_train::loss::summed_loss;
use lorakit_train::optim::AdamW;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// (hidden, layers, heads, kv heads, intermediate, vocab)
fn preset(name: &str) -> Option<(usize, usize, usize, usize, usize, usize)> {
    Some(match name {
        "tiny" => (64, 2, 4, 2, 128, 384),
        "small" => (512, 8, 8, 4, 1408, 32000),
        "1b" => (2048, 22, 32, 4, 5632, 32000),
        _ => return None,
    })
}

/// Counts live heap bytes and their high-water mark: peak RSS also holds freed memory the
/// allocator kept, which hides what a memory-saving path saves.
struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Peak resident memory of this process (Linux `VmHWM`), bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak bytes in use (the high-water mark) of the CUDA device's default memory pool, where
/// candle allocates every tensor: the counterpart of `torch.cuda.max_memory_allocated`.
#[cfg(feature = "cuda")]
fn gpu_peak_bytes(device: &Device) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = device else {
        return None;
    };
    let cu_device = dev.cuda_stream().context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut high = 0u64;
    // SAFETY: plain driver queries writing into the locals above.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, cu_device) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        let out = &mut high as *mut u64 as *mut std::ffi::c_void;
        if sys::cuMemPoolGetAttribute(pool, attr, out) != sys::CUresult::CUDA_SUCCESS {
            return None;
        }
    }
    Some(high)
}

#[cfg(not(feature = "cuda"))]
fn gpu_peak_bytes(_: &Device) -> Option<u64> {
    None
}

/// Milliseconds per step of each phase, from seconds summed over `steps` steps.
fn phase_ms(phases: &[f64; 4], steps: usize) -> serde_json::Value {
    let ms = |i: usize| 1e3 * phases[i] / steps.max(1) as f64;
    serde_json::json!({"forward": ms(0), "loss": ms(1), "backward": ms(2), "optimizer": ms(3)})
}

/// Seeded N(0, 0.02²)-ish values (sum of uniforms), so runs are comparable.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            let mut s = 0f32;
            for _ in 0..3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s += (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            s * 0.04
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let launched = Instant::now();
    lorakit_train::runtime::tune_process();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let pos: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| {
            let flag_value = *i > 0 && args[i - 1].starts_with("--");
            !(a.starts_with("--") || flag_value)
        })
        .map(|(_, a)| a)
        .collect();
    let name = pos.first().map(|s| s.as_str()).unwrap_or("small");
    let (h, layers, heads, kv, inter, vocab) =
        preset(name).ok_or_else(|| anyhow::anyhow!("unknown preset {name:?}: tiny, small, 1b"))?;
    let num = |i: usize, d: usize| pos.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (batch, seq, steps) = (num(1, 2), num(2, 128), num(3, 5));
    let device = match flag("--device").as_deref() {
        Some("cuda") => lorakit_train::runtime::cuda_device(0)?,
        _ => Device::Cpu,
    };
    let dtype = match flag("--dtype").as_deref() {
        Some("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let cfg = registry::parse_config(
        serde_json::json!({"model_type": "llama", "vocab_size": vocab, "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "max_position_embeddings": seq.max(2048),
            "rms_norm_eps": 1e-5, "tie_word_embeddings": false}),
        std::path::Path::new(name),
    )?;
    // random base weights
    let d = h / heads;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, h]),
        ("model.norm.weight".into(), vec![h]),
        ("lm_head.weight".into(), vec![vocab, h]),
    ];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("self_attn.q_proj", vec![heads * d, h]),
            ("self_attn.k_proj", vec![kv * d, h]),
            ("self_attn.v_proj", vec![kv * d, h]),
            ("self_attn.o_proj", vec![h, heads * d]),
            ("mlp.gate_proj", vec![inter, h]),
            ("mlp.up_proj", vec![inter, h]),
            ("mlp.down_proj", vec![h, inter]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
        shapes.push((format!("{p}.input_layernorm.weight"), vec![h]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
    }
    let mut tensors = HashMap::new();
    for (i, (n, s)) in shapes.into_iter().enumerate() {
        let count = s.iter().product();
        let v = if n.contains("norm") {
            vec![1f32; count]
        } else {
            random(count, i as u64 + 1)
        };
        tensors.insert(n, Tensor::from_vec(v, s, &device)?.to_dtype(dtype)?);
    }
    let dora = args.iter().any(|a| a == "--dora");
    let mut lora = LoraConfig {
        r: 16,
        lora_alpha: 32.0,
        use_dora: dora,
        ..LoraConfig::default()
    };
    lora.target_modules = Some(ModuleSpec::List(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec(),
    ));
    let varmap = VarMap::new();
    let (model, _) = build_causal_lm(
        &*cfg,
        VarBuilder::from_tensors(tensors, dtype, &device),
        Adapters::Train {
            config: lora,
            varmap: varmap.clone(),
            seed: 1,
            dropout_seed: Default::default(),
        },
    )?;
    let vars: std::collections::BTreeMap<_, _> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let trainable: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, 0.0)?;
    let ids: Vec<u32> = random(batch * seq, 99)
        .iter()
        .map(|v| ((v.abs() * 1e6) as usize % vocab) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    let n = batch * (seq - 1);
    let positions: Vec<u32> = (0..batch)
        .flat_map(|b| (0..seq - 1).map(move |t| (b * seq + t) as u32))
        .collect();
    let positions = Tensor::from_vec(positions, n, &device)?;
    let labels = ids.narrow(1, 1, seq - 1)?.flatten_all()?;
    let var_tensors: Vec<Tensor> = opt
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let checkpointing = args.iter().any(|a| a == "--checkpointing");
    let full_logits = args.iter().any(|a| a == "--full-logits");
    // time per phase (synchronised), summed over the timed steps
    let mut phases = [0f64; 4];
    let mut step = |phases: &mut [f64; 4]| -> anyhow::Result<f32> {
        let mut mark = Instant::now();
        let mut lap = |i: usize, phases: &mut [f64; 4]| -> anyhow::Result<()> {
            device.synchronize()?;
            phases[i] += mark.elapsed().as_secs_f64();
            mark = Instant::now();
            Ok(())
        };
        let scale = 1.0 / n as f64;
        let (loss, grads) = if checkpointing {
            // forward, loss and the recomputing backward are one call: all counted as backward
            let (loss, grads) = model.checkpointed_loss_and_grads(
                &ids,
                None,
                &positions,
                &labels,
                scale,
                &var_tensors,
            )?;
            lap(2, phases)?;
            (loss, grads)
        } else {
            let loss = if full_logits {
                let logits = model.logits_at(&ids, None, true, &positions)?;
                lap(0, phases)?;
                (summed_loss(&logits, &labels)? * scale)?
            } else {
                // the output head runs inside the chunked loss
                let hidden = model.hidden_states(&ids, None, true)?;
                lap(0, phases)?;
                (model.head_loss(&hidden, &positions, &labels, true)? * scale)?
            };
            lap(1, phases)?;
            let store = loss.backward()?;
            let grads = var_tensors.iter().map(|v| store.get(v).cloned()).collect();
            lap(2, phases)?;
            (loss.to_scalar::<f32>()?, grads)
        };
        let g: Vec<Tensor> = grads
            .into_iter()
            .zip(&var_tensors)
            .map(|(g, v)| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
            .collect::<candle_core::Result<_>>()?;
        opt.step(&g, 2e-4)?;
        lap(3, phases)?;
        Ok(loss)
    };
    let setup = launched.elapsed().as_secs_f64();
    let mut first_phases = [0f64; 4];
    let first_loss = step(&mut first_phases)?; // warm-up, also the cold-start point

    device.synchronize()?;
    let cold_start = launched.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut last = first_loss;
    for _ in 0..steps {
        last = step(&mut phases)?;
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    let tokens = (batch * seq * steps) as f64;
    let (peak, peak_kind) = match gpu_peak_bytes(&device) {
        Some(b) => (Some(b), "peak bytes in use in the device's memory pool"),
        None => (peak_rss(), "process peak RSS"),
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": if dora { "lorakit+dora" } else { "lorakit" }, "preset": name, "batch": batch, "seq": seq, "steps": steps,
            "device": if device.is_cuda() { "cuda" } else { "cpu" }, "dtype": format!("{dtype:?}"),
            "trainable_params": trainable,
            "tokens_per_s": tokens / secs, "ms_per_step": 1e3 * secs / steps as f64,
            "peak_bytes": peak, "peak_kind": peak_kind,
            "peak_heap_bytes": PEAK.load(Ordering::Relaxed),
            "gradient_checkpointing": checkpointing, "full_logits": full_logits,
            "cold_start_s": cold_start, "setup_s": setup,
            "first_step_phase_ms": phase_ms(&first_phases, 1),
            "phase_ms": phase_ms(&phases, steps), "first_loss": first_loss, "last_loss": last,
        })
    );
    Ok(())
}
