//! `lorakit merge`: fold a PEFT adapter into its base model (see lorakit-merge), optionally
//! verifying that the merged model computes what base + adapter computes.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::output_guard::{check_replaceable, occupied, Input};
use lorakit_adapter::Adapters;
use lorakit_merge::{merge_pending, MergeOptions, OutDType};
use lorakit_models::BaseModel;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DTypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum QuantizeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q5_k")]
    Q5K,
    #[value(name = "q6_k")]
    Q6K,
}

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a Hugging Face model directory, or a llama .gguf file (converted first, as
    /// `lorakit convert` does, so the output is an ordinary Hugging Face directory).
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter: a PEFT directory or a llama.cpp .gguf adapter. Repeat, optionally weighted
    /// (`--adapter A --adapter B:0.5`), to merge the weighted sum of several.
    #[arg(long, required = true)]
    pub adapter: Vec<String>,
    /// Output: a directory (Hugging Face safetensors model), or a .gguf file (a llama.cpp model:
    /// metadata and tokenizer carried over from a .gguf base, or written from a Hugging Face
    /// directory's config.json and tokenizer.json for llama, mistral, qwen2 and qwen3).
    #[arg(long)]
    pub out: PathBuf,
    /// Type of a merged GGUF's 2-D weights (default: a GGUF base's own types, f16 from a
    /// directory; 1-D tensors stay f32).
    #[arg(long, value_enum)]
    pub quantize: Option<QuantizeArg>,
    /// dtype of the merged weights; `auto` keeps the base's.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DTypeArg,
    /// Run base + adapter and the merged model on a fixed input and report the largest logit
    /// difference; the merged model takes OUT's place only if the check passes.
    #[arg(long)]
    pub verify: bool,
    /// Replace OUT if it exists and is not empty — only a directory lorakit made, never one that
    /// is, holds or lies inside the base or the adapter.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let start = Instant::now();
    let adapter_paths: Vec<PathBuf> = args
        .adapter
        .iter()
        .map(|a| crate::adapters::AdapterArg::parse(a).map(|a| a.path))
        .collect::<Result<_>>()?;
    let to_gguf = args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if to_gguf {
        return merge_gguf(&args, &adapter_paths, start);
    }
    if args.quantize.is_some() {
        bail!("--quantize applies to a merged GGUF (--out FILE.gguf); a directory takes --dtype");
    }
    if args.force && occupied(&args.out) {
        let mut protect = vec![Input::new("the base model", &args.base)];
        protect.extend(adapter_paths.iter().map(|p| Input::new("the adapter", p)));
        check_replaceable(&args.out, &protect)?;
    }
    let adapter = crate::adapters::load_required(&args.adapter, &args.base)?;
    let dtype = match args.dtype {
        DTypeArg::Auto => OutDType::Auto,
        DTypeArg::F32 => OutDType::Fixed(DType::F32),
        DTypeArg::Bf16 => OutDType::Fixed(DType::BF16),
        DTypeArg::F16 => OutDType::Fixed(DType::F16),
    };
    // A GGUF base is first written as a Hugging Face directory next to the output.
    let converted = if lorakit_models::is_gguf(&args.base) {
        let parent = args
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let tmp = tempfile::Builder::new()
            .prefix(".lorakit-gguf-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a temporary directory in {}", parent.display()))?;
        let dir = tmp.path().join("base");
        crate::convert::convert(&args.base, &dir, DType::F32, false)?;
        Some((tmp, dir))
    } else {
        None
    };
    let base: &Path = converted
        .as_ref()
        .map(|(_, d)| d.as_path())
        .unwrap_or(&args.base);
    let pending = merge_pending(
        base,
        &adapter,
        &args.out,
        &MergeOptions {
            dtype,
            force: args.force,
        },
    )?;
    // --verify checks the finished model under its temporary name: a failed check leaves OUT
    // as it was
    let verified = if args.verify {
        let (diff, positions) = verify(&args.base, &args.adapter, pending.path())
            .context("--verify (running both models)")?;
        let tolerance = match args.dtype {
            DTypeArg::F32 => 1e-3,
            _ => f32::INFINITY, // rounding to 16 bits moves logits; report, don't judge
        };
        if diff > tolerance || !diff.is_finite() {
            bail!("verification failed: the merged model differs from base + adapter by {diff:.3e} (> {tolerance:.0e}) over {positions} positions; {} was left as it was", args.out.display());
        }
        Some((diff, positions))
    } else {
        None
    };
    let summary = pending.commit()?;
    say!(
        "merged {} LoRA module{} ({} replaced whole) into {} tensors; wrote {} ({} shard{}, {:.1} MB) in {:.2} s",
        summary.merged.len(),
        if summary.merged.len() == 1 { "" } else { "s" },
        summary.replaced.len(),
        summary.tensors,
        summary.out.display(),
        summary.shards,
        if summary.shards == 1 { "" } else { "s" },
        summary.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    if let Some(head) = &summary.untied {
        say!("note: the adapter changes the output head, so `{head}` is now stored apart from the embeddings (tie_word_embeddings: false)");
    }
    if let Some((diff, positions)) = verified {
        say!("verify: max |logit difference| between base + adapter and the merged model = {diff:.3e} over {positions} positions");
    }
    Ok(ExitCode::SUCCESS)
}

/// `merge --out FILE.gguf`: the adapter folded into a GGUF base, written as a GGUF model.
fn merge_gguf(args: &Args, adapter_paths: &[PathBuf], start: Instant) -> Result<ExitCode> {
    use lorakit_export::merged_gguf::{merge_to_gguf, Quantize};
    if args.verify || !matches!(args.dtype, DTypeArg::Auto) {
        bail!(
            "--out {}: a merged GGUF takes --quantize (not --dtype or --verify)",
            args.out.display()
        );
    }
    let mut inputs: Vec<&Path> = adapter_paths.iter().map(PathBuf::as_path).collect();
    inputs.push(&args.base);
    crate::adapters::check_file_output(&args.out, args.force, &inputs)?;
    let adapter = crate::adapters::load_required(&args.adapter, &args.base)?;
    let base = lorakit_export::adapter_gguf::Base::open(&args.base)?;
    let quantize = args.quantize.map(|q| match q {
        QuantizeArg::F32 => Quantize::F32,
        QuantizeArg::F16 => Quantize::F16,
        QuantizeArg::Bf16 => Quantize::BF16,
        QuantizeArg::Q8_0 => Quantize::Q8_0,
        QuantizeArg::Q4_0 => Quantize::Q4_0,
        QuantizeArg::Q4K => Quantize::Q4K,
        QuantizeArg::Q5K => Quantize::Q5K,
        QuantizeArg::Q6K => Quantize::Q6K,
    });
    let r = if lorakit_models::is_gguf(&args.base) {
        merge_to_gguf(&adapter, &base, &args.out, quantize)?
    } else {
        let vocab = base.model.config.dimensions().vocab;
        let tokenizer = lorakit_train::gguf_vocab::gguf_metadata(&args.base, vocab)
            .map_err(|(file, m)| anyhow::anyhow!("{file}: {m}"))?;
        lorakit_export::hf_to_gguf::merge_hf_to_gguf(
            &adapter, &base, &args.out, quantize, tokenizer,
        )?
    };
    say!(
        "merged {} LoRA module{} into {} tensors; wrote {} ({:.1} MB, GGUF) in {:.2} s",
        r.merged,
        if r.merged == 1 { "" } else { "s" },
        r.tensors,
        args.out.display(),
        r.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    if r.fell_back > 0 {
        say!("note: {} tensor(s) stored as q8_0 or f16: their rows are not whole blocks of the requested type", r.fell_back);
    }
    Ok(ExitCode::SUCCESS)
}

/// Largest absolute logit difference on a fixed input, and the number of positions compared.
fn verify(base: &Path, adapter: &[String], merged: &Path) -> Result<(f32, usize)> {
    let dev = Device::Cpu;
    let (with_adapter, _) = BaseModel::open(base)?.load_causal_lm(
        crate::adapters::adapters(adapter, base)?,
        DType::F32,
        &dev,
    )?;
    let (merged_model, _) =
        BaseModel::open(merged)?.load_causal_lm(Adapters::None, DType::F32, &dev)?;
    let vocab = with_adapter.vocab_size() as u32;
    let len = 16usize;
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let ids = Tensor::from_vec(ids, (1, len), &dev)?;
    let a = with_adapter.forward(&ids, None, false)?;
    let b = merged_model.forward(&ids, None, false)?;
    // logits that are not numbers agree with nothing, not even with themselves
    let finite = |t: &Tensor| -> Result<bool> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()))
    };
    if !finite(&a)? || !finite(&b)? {
        return Ok((f32::NAN, len));
    }
    let diff = lorakit_ops::compare::max_abs_diff(&a, &b)?;
    Ok((diff, len))
}
