//! `lorakit convert MODEL.gguf --out DIR`: a llama GGUF as an ordinary Hugging Face model
//! directory — config.json, model.safetensors (dequantised, q/k in Hugging Face order),
//! tokenizer.json and tokenizer_config.json (chat template, special tokens) — that transformers,
//! PEFT and lorakit load. `lorakit merge --base MODEL.gguf` converts this way first.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use lorakit_adapter::fsutil::{atomic_write, AtomicDir};
use lorakit_adapter::output_guard::{check_replaceable, occupied, write_marker, Input};
use lorakit_models::gguf::{hf_config_json, load_hf, GgufHeader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// A llama-architecture .gguf file.
    pub model: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// dtype of the written weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Replace OUT if it exists and is not empty — only a directory lorakit made, never one that
    /// is, holds or lies inside the GGUF file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

/// Writes the Hugging Face directory for `gguf` at `out` (all at once: temp dir + rename).
pub fn convert(gguf: &Path, out: &Path, dtype: DType, force: bool) -> Result<()> {
    if force && occupied(out) {
        check_replaceable(out, &[Input::new("the GGUF model", gguf)])?;
    }
    if !lorakit_models::is_gguf(gguf) {
        bail!("{}: not a .gguf file", gguf.display());
    }
    let header = GgufHeader::from_file(gguf)?;
    let mut config = hf_config_json(&header, gguf)?;
    let tok = lorakit_train::gguf_tokenizer::from_header(&header)
        .map_err(|(k, m)| anyhow::anyhow!("{}: `{k}`: {m}", gguf.display()))?;
    let (_, tensors) = load_hf(gguf, &Device::Cpu)?;
    let mut named: Vec<(String, candle_core::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    config["torch_dtype"] = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
    .into();
    let dir = AtomicDir::create(out, force)?;
    lorakit_adapter::safetensors_writer::write_atomic(
        &dir.path().join("model.safetensors"),
        &named,
        &[("format".to_string(), "pt".to_string())],
    )?;
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).context("serialising JSON");
    atomic_write(&dir.path().join("config.json"), &json(&config)?)?;
    let tokenizer = tok
        .tokenizer
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    atomic_write(&dir.path().join("tokenizer.json"), tokenizer.as_bytes())?;
    let name = |id: Option<u32>| id.and_then(|i| tok.tokenizer.id_to_token(i));
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(tok.bos_id),
        "eos_token": name(tok.eos_id),
        "pad_token": name(tok.pad_id),
        "add_bos_token": matches!(header.metadata.get("tokenizer.ggml.add_bos_token"), Some(lorakit_models::gguf::Value::Bool(true))),
    });
    if let Some(t) = &tok.chat_template {
        tc["chat_template"] = t.clone().into();
    }
    atomic_write(&dir.path().join("tokenizer_config.json"), &json(&tc)?)?;
    write_marker(dir.path(), "convert")?;
    dir.commit()?;
    Ok(())
}

pub fn run(args: Args) -> Result<ExitCode> {
    let dtype = match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::Bf16 => DType::BF16,
        DTypeArg::F16 => DType::F16,
    };
    let start = std::time::Instant::now();
    convert(&args.model, &args.out, dtype, args.force)?;
    say!(
        "wrote {} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) in {:.2} s",
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
