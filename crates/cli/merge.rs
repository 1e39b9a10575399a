//! `lorakit merge`: fold a PEFT adapter into its base model (see lorakit-merge), optionally
//! verifying that the merged model computes what base + adapter computes.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::output_guard::{check_replaceable, occupied, Input};
use lorakit_adapter::{Adapters, PeftAdapter};
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

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a Hugging Face model directory, or a llama .gguf file (converted first, as
    /// `lorakit convert` does, so the output is an ordinary Hugging Face directory).
    #[arg(long)]
    pub base: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory for the merged model.
    #[arg(long)]
    pub out: PathBuf,
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
    if args.force && occupied(&args.out) {
        check_replaceable(
            &args.out,
            &[
                Input::new("the base model", &args.base),
                Input::new("the adapter", &args.adapter),
            ],
        )?;
    }
    let adapter = PeftAdapter::load(&args.adapter)?;
    for w in &adapter.warnings {
        crate::warn(w);
    }
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

/// Largest absolute logit difference on a fixed input, and the number of positions compared.
fn verify(base: &Path, adapter: &Path, merged: &Path) -> Result<(f32, usize)> {
    let dev = Device::Cpu;
    let (with_adapter, _) = BaseModel::open(base)?.load_causal_lm(
        Adapters::Loaded(PeftAdapter::load(adapter)?),
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
