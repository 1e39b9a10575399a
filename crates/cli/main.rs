//! `lorakit`: parameter-efficient fine-tuning on candle. One file per subcommand.

/// `println!` that returns an error when standard output cannot be written (a full disk, a
/// closed pipe) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("writing to standard output: {e}"))?;
    }};
}

/// A message on stderr; a failed write is ignored (there is nowhere left to report it).
pub(crate) fn note(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{text}");
}

pub(crate) fn warn(text: &str) {
    note(&format!("warning: {text}"));
}

mod adapters;
mod combine;
mod convert;
mod eval;
mod export;
mod generate;
mod inspect;
mod merge;
mod quant_args;
mod train;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lorakit",
    version,
    about = "LoRA fine-tuning toolkit: train, evaluate, inspect and merge PEFT adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a LoRA adapter from a YAML recipe.
    Train(train::Args),
    /// Loss and perplexity of a model (optionally with an adapter) on a JSONL data set.
    Eval(eval::Args),
    /// Write a llama GGUF as a Hugging Face model directory (safetensors, config, tokenizer).
    Convert(convert::Args),
    /// Generate text from a model (optionally with an adapter), streamed to stdout.
    Generate(generate::Args),
    /// Show a model's architecture, size and linear modules, and which ones LoRA targets would wrap.
    Inspect(inspect::Args),
    /// Write an adapter as a llama.cpp GGUF LoRA adapter, or a GGUF adapter as a PEFT directory.
    Export(export::Args),
    /// Combine several LoRA adapters into one (PEFT's add_weighted_adapter: cat, linear, svd).
    Combine(combine::Args),
    /// Fold a PEFT LoRA adapter into its base model and write an ordinary Hugging Face model directory.
    Merge(merge::Args),
}

fn main() -> ExitCode {
    lorakit_train::runtime::tune_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Export(a) => export::run(a),
        Command::Combine(a) => combine::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            use std::io::Write as _;
            // the cause chain, without repeating a cause a message already quotes
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::FAILURE
        }
    }
}
