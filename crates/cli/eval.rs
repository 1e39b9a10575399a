//! `lorakit eval --model MODEL [--adapter DIR] --data FILE.jsonl`: loss, perplexity, tokens.
use anyhow::Result;
use candle_core::{DType, Device};
use lorakit_adapter::{Adapters, PeftAdapter};
use lorakit_models::ModelDir;
use lorakit_train::eval::evaluate;
use lorakit_train::{data, DataFormat, TextTokenizer};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Completion,
    Instruction,
    Chat,
}

#[derive(clap::Args)]
pub struct Args {
    /// Base model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter directory to apply (unmerged).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON Lines data set.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, value_enum, default_value = "completion")]
    pub format: FormatArg,
    #[arg(long, default_value_t = 512)]
    pub max_seq_len: usize,
    /// Score prompt tokens too (instruction/chat), as `train_on_inputs: true` does.
    #[arg(long)]
    pub train_on_inputs: bool,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object: {"loss", "perplexity", "tokens"}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let format = match args.format {
        FormatArg::Completion => DataFormat::Completion,
        FormatArg::Instruction => DataFormat::Instruction,
        FormatArg::Chat => DataFormat::Chat,
    };
    let tok = TextTokenizer::from_model_dir(&args.model)?;
    let ds = data::load(
        &args.data,
        format,
        &tok,
        args.max_seq_len.max(2),
        args.train_on_inputs,
    )?;
    let adapters = match &args.adapter {
        Some(d) => {
            let a = PeftAdapter::load(d)?;
            for w in &a.warnings {
                crate::warn(w);
            }
            Adapters::Loaded(a)
        }
        None => Adapters::None,
    };
    let device = Device::Cpu;
    let (model, _) = ModelDir::open(&args.model)?.load(adapters, DType::F32, &device)?;
    let r = evaluate(&model, &ds, tok.pad_id, args.batch_size, &device)?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens})
        );
    } else {
        say!(
            "loss {:.6}  perplexity {:.4}  tokens {}  ({} examples, {} truncated)",
            r.loss,
            r.perplexity,
            r.tokens,
            ds.examples.len(),
            ds.truncated
        );
    }
    Ok(ExitCode::SUCCESS)
}
