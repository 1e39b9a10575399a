//! `lorakit generate --model MODEL [--adapter DIR] (--prompt TEXT | --chat TEXT)`: streams the
//! model's continuation to stdout.
use anyhow::{bail, Result};
use lorakit_models::generate::{generate, GenerateOptions};
use lorakit_train::data::ChatTemplate;
use lorakit_train::runtime;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Base model: a Hugging Face model directory, a .gguf file, or a hub id (org/name[@revision]).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter to apply (unmerged): a PEFT directory or a llama.cpp .gguf adapter. Repeat for
    /// several, each optionally weighted (`--adapter A --adapter B:0.5`): their updates add.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Raw text to continue.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, sent through the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[command(flatten)]
    pub quant: crate::quant_args::QuantArgs,
    /// Also write a JSON file with the prompt's token ids, the logits at every prompt
    /// position (f32, one full forward pass) and the generated ids: for comparing lorakit with
    /// another runtime (llama.cpp, transformers) on the same model and adapter.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!(
            "--temperature must be a finite number >= 0, got {}",
            args.temperature
        );
    }
    if args.top_p.is_nan() || args.top_p <= 0.0 || args.top_p > 1.0 {
        bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    let device = runtime::device(&args.device)?;
    let path = lorakit_models::hub::resolve(&args.model)?;
    let (model, tok) = crate::eval::load_model(&path, &args.adapter, &device, &args.quant)?;
    let ids = match (&args.prompt, &args.chat) {
        (Some(p), _) => tok.encode(p, true)?,
        (None, Some(user)) => {
            let template = ChatTemplate::new(&tok)?;
            let mut messages = Vec::new();
            if let Some(s) = &args.system {
                messages.push(serde_json::json!({"role": "system", "content": s}));
            }
            messages.push(serde_json::json!({"role": "user", "content": user}));
            let text = template
                .render(&messages, &tok, true)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tok.config_file.display()))?;
            tok.encode(&text, false)?
        }
        (None, None) => bail!("pass --prompt or --chat"),
    };
    // end of sequence, and the end-of-turn tokens chat models use
    let mut stop: Vec<u32> = tok.eos_id.into_iter().collect();
    for t in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"] {
        stop.extend(tok.token_id(t));
    }
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop: stop.clone(),
    };
    // Stream: decode everything generated so far and print what is new, holding back a
    // trailing partial UTF-8 character; stop tokens are not printed.
    let mut shown = 0usize;
    let mut text_ids: Vec<u32> = Vec::new();
    let mut out = std::io::stdout();
    generate(&*model, &ids, &opts, &device, |t| {
        if stop.contains(&t) {
            return Ok(true);
        }
        text_ids.push(t);
        let text = tok.decode(&text_ids).unwrap_or_default();
        if !text.ends_with('\u{fffd}') && text.len() > shown {
            let new = text.get(shown..).unwrap_or("");
            if out
                .write_all(new.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                return Ok(false);
            }
            shown = text.len();
        }
        Ok(true)
    })?;
    say!("");
    if let Some(file) = &args.logits_out {
        let input = candle_core::Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
        let logits = model
            .forward(&input, None, false)?
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        let json = serde_json::json!({
            "prompt_ids": ids,
            "logits": logits,
            "generated_ids": text_ids,
        });
        lorakit_adapter::fsutil::atomic_write(file, json.to_string().as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}
