//! `lorakit eval --model MODEL [--adapter DIR] --data FILE.jsonl`: loss, perplexity, tokens —
//! or, with `--labels a,b,...`, classification accuracy (the most likely label after the prompt).
use anyhow::{bail, Context, Result};
use lorakit_models::{BaseModel, CausalLm, Task};
use lorakit_train::eval::evaluate;
use lorakit_train::task_model::TaskModel;
use lorakit_train::{choices, data, runtime, DataFormat, TextTokenizer};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Completion,
    Instruction,
    Chat,
    /// {"text", "label"} for a BERT classifier.
    Classification,
    /// {"prompt", "chosen", "rejected"} (or conversational): the --objective's loss and TRL's
    /// reward figures, the reference being the model without the adapter.
    Preference,
}

impl From<FormatArg> for DataFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Completion => DataFormat::Completion,
            FormatArg::Instruction => DataFormat::Instruction,
            FormatArg::Chat => DataFormat::Chat,
            FormatArg::Classification => DataFormat::Classification,
            FormatArg::Preference => DataFormat::Preference,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ObjectiveArg {
    Dpo,
    Orpo,
}

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter to apply (unmerged): a PEFT directory or a llama.cpp .gguf adapter. Repeat for
    /// several, each optionally weighted (`--adapter A --adapter B:0.5`): their updates add.
    #[arg(long)]
    pub adapter: Vec<String>,
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
    /// Classify instead: every answer must be one of these comma-separated labels; report
    /// accuracy of picking the most likely label after each prompt.
    #[arg(long, value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Rows per batch (examples per batch, or packed rows with --packing).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Pack examples into rows of --max-seq-len tokens, each attending only to itself: the same
    /// loss with less padding (causal-LM formats).
    #[arg(long)]
    pub packing: bool,
    /// --format preference: dpo or orpo.
    #[arg(long, value_enum, default_value = "dpo")]
    pub objective: ObjectiveArg,
    /// --format preference: DPO's β or ORPO's λ.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub quant: crate::quant_args::QuantArgs,
    /// Print one JSON object: {"loss", "perplexity", "tokens"} (with --labels: {"accuracy",
    /// "correct", "total", "labels", "confusion"}).
    #[arg(long)]
    pub json: bool,
}

/// A causal LM (a local directory or GGUF: resolve hub ids first) with an optional adapter.
pub fn load_model(
    path: &Path,
    adapter: &[String],
    device: &candle_core::Device,
    quant: &crate::quant_args::QuantArgs,
) -> Result<(Box<dyn CausalLm>, TextTokenizer)> {
    // the model's header first: a config that cannot be right is reported before anything else
    let base = BaseModel::open(path)?.with_quantization(quant.quantization()?);
    load_opened(base, path, adapter, device)
}

/// [`load_model`] of a model whose headers are already read.
fn load_opened(
    base: BaseModel,
    path: &Path,
    adapter: &[String],
    device: &candle_core::Device,
) -> Result<(Box<dyn CausalLm>, TextTokenizer)> {
    base.check_task(Task::CausalLm)?;
    let tok = TextTokenizer::open(path)?;
    let adapters = crate::adapters::adapters(adapter, path)?;
    let dtype = runtime::dtype("auto", device);
    let (m, _) = base.load_causal_lm(adapters, dtype, device)?;
    Ok((m, tok))
}

/// A sequence classifier: loss and accuracy on `{"text", "label"}` data.
fn run_classifier(args: &Args, path: &Path, base: BaseModel) -> Result<ExitCode> {
    let device = runtime::device(&args.device)?;
    let labels = match (&args.labels, args.adapter.first().map(|a| crate::adapters::AdapterArg::parse(a)).transpose()?.and_then(|a| lorakit_train::adapter_labels(&a.path))) {
        (Some(l), _) => l.iter().map(|l| l.trim().to_string()).collect(),
        (None, Some(l)) => l,
        (None, None) => anyhow::bail!("{}: a {} classifier needs its label names: pass --labels a,b,... (adapters trained by lorakit carry them)", path.display(), base.config.model_type()),
    };
    let tok = TextTokenizer::open(path)?;
    let ds = data::load_labelled(&args.data, &tok, args.max_seq_len, &labels)?;
    let adapters = crate::adapters::adapters(&args.adapter, path)?;
    let (m, _) = base.load_classifier(
        adapters,
        labels.len(),
        runtime::dtype("auto", &device),
        &device,
    )?;
    let model = TaskModel::Classifier(m);
    let r = evaluate(&model, &ds, tok.pad_id, args.batch_size, None, &device)
        .with_context(|| format!("evaluating on {}", args.data.display()))?;
    let acc = r.accuracy.unwrap_or(0.0);
    if args.json {
        say!(
            "{}",
            serde_json::json!({"loss": r.loss, "accuracy": acc, "total": r.tokens, "labels": labels})
        );
    } else {
        say!(
            "accuracy {acc:.4}  loss {:.6}  ({} examples; labels {})",
            r.loss,
            r.tokens,
            labels.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: Args) -> Result<ExitCode> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1, got 0");
    }
    if args.max_seq_len < 2 {
        bail!(
            "--max-seq-len must be at least 2 (a scored token needs one before it), got {}",
            args.max_seq_len
        );
    }
    let format: DataFormat = args.format.into();
    let path = lorakit_models::hub::resolve(&args.model)?;
    let base = BaseModel::open(&path)?.with_quantization(args.quant.quantization()?);
    let is_classifier = matches!(
        base.config.default_task(),
        Task::SequenceClassification { .. }
    );
    if is_classifier || format == DataFormat::Classification {
        if args.packing {
            bail!("--packing packs causal-LM examples; a classified example is one row");
        }
        return run_classifier(&args, &path, base);
    }
    let device = runtime::device(&args.device)?;
    let (model, tok) = load_opened(base, &path, &args.adapter, &device)?;
    if format == DataFormat::Preference {
        return run_preference(&args, &*model, &tok, &device);
    }
    if let Some(labels) = &args.labels {
        if args.packing {
            bail!("--packing applies to the loss; --labels scoring already packs each prompt with its candidate labels");
        }
        let labels: Vec<String> = labels.iter().map(|l| l.trim().to_string()).collect();
        let set = choices::load(&args.data, format, &tok, &labels)?;
        let r = choices::classify(&*model, &set, &labels, tok.pad_id, args.batch_size, &device)
            .with_context(|| format!("scoring --labels on {}", args.data.display()))?;
        if args.json {
            say!("{}", r.to_json());
        } else {
            say!(
                "accuracy {:.4}  ({} of {} correct)",
                r.accuracy(),
                r.correct(),
                r.total()
            );
            for (i, l) in labels.iter().enumerate() {
                let total: usize = r.confusion[i].iter().sum();
                let predicted: usize = r.confusion.iter().map(|row| row[i]).sum();
                say!(
                    "  {l:<12} {:>5} examples, {:>5} correct, predicted {:>5} times",
                    total,
                    r.confusion[i][i],
                    predicted
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let ds = data::load(
        &args.data,
        format,
        &tok,
        args.max_seq_len,
        args.train_on_inputs,
    )?;
    let model = TaskModel::CausalLm(model);
    let packing = args.packing.then_some(args.max_seq_len);
    let r = evaluate(&model, &ds, tok.pad_id, args.batch_size, packing, &device)
        .with_context(|| format!("evaluating on {}", args.data.display()))?;
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

/// Preference pairs: the objective's mean loss and TRL's reward figures.
fn run_preference(
    args: &Args,
    model: &dyn CausalLm,
    tok: &TextTokenizer,
    device: &candle_core::Device,
) -> Result<ExitCode> {
    use lorakit_train::preference::{self, Objective, PreferenceLoss};
    if args.packing || args.labels.is_some() {
        bail!("--format preference takes neither --packing nor --labels");
    }
    if !(args.beta > 0.0 && args.beta.is_finite()) {
        bail!("--beta must be a positive number, got {}", args.beta);
    }
    let objective = match args.objective {
        ObjectiveArg::Dpo => Objective::Dpo,
        ObjectiveArg::Orpo => Objective::Orpo,
    };
    let set = preference::load(&args.data, tok, args.max_seq_len)?;
    let loss = PreferenceLoss {
        objective,
        beta: args.beta,
    };
    let m = preference::evaluate(model, &set, loss, tok.pad_id, args.batch_size, None, device)
        .with_context(|| format!("evaluating pairs in {}", args.data.display()))?;
    if args.json {
        say!(
            "{}",
            serde_json::json!({
                "objective": objective.name(),
                "beta": args.beta,
                "loss": m.loss,
                "rewards_chosen": m.rewards_chosen,
                "rewards_rejected": m.rewards_rejected,
                "reward_accuracy": m.reward_accuracy,
                "reward_margin": m.reward_margin,
                "pairs": set.pairs.len(),
            })
        );
    } else {
        say!(
            "{} loss {:.6}  reward accuracy {:.4}  margin {:.4}  chosen {:.4}  rejected {:.4}  ({} pairs, {} truncated)",
            objective.name(),
            m.loss,
            m.reward_accuracy,
            m.reward_margin,
            m.rewards_chosen,
            m.rewards_rejected,
            set.pairs.len(),
            set.truncated
        );
    }
    Ok(ExitCode::SUCCESS)
}
