//! `lorakit export --base MODEL --adapter ADAPTER --out FILE.gguf`: an adapter as a llama.cpp
//! GGUF LoRA adapter (`llama-cli -m MODEL.gguf --lora FILE.gguf`); with `--to peft`, any adapter
//! lorakit reads (a GGUF adapter included) as a PEFT directory.
use anyhow::{bail, Result};
use lorakit_adapter::card::Card;
use lorakit_adapter::output_guard::{check_replaceable, occupied, Input};
use lorakit_export::adapter_gguf::{export, AdapterDType, Base};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
    #[value(name = "q8_0")]
    Q8_0,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToArg {
    Gguf,
    Peft,
}

#[derive(clap::Args)]
pub struct Args {
    /// The base model the adapter was trained for: a .gguf file or a Hugging Face directory
    /// (names, shapes and q/k row order come from it).
    #[arg(long)]
    pub base: PathBuf,
    /// The adapter: a PEFT directory or a .gguf adapter; repeat with weights (`A --adapter
    /// B:0.5`) to export their weighted sum.
    #[arg(long, required = true)]
    pub adapter: Vec<String>,
    /// Output: a .gguf file (default format), or a directory with --to peft.
    #[arg(long)]
    pub out: PathBuf,
    /// Format of the output (default: gguf).
    #[arg(long, value_enum, default_value = "gguf")]
    pub to: ToArg,
    /// Type of the GGUF adapter's tensors (q8_0 where rows are whole 32-value blocks, else f16).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DTypeArg,
    /// Replace OUT if it exists (a GGUF file lorakit could have written, or a directory lorakit
    /// made; never an input).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    let base_path = lorakit_models::hub::resolve(&args.base)?;
    let adapter = crate::adapters::load_required(&args.adapter, &base_path)?;
    let inputs: Vec<PathBuf> = args
        .adapter
        .iter()
        .map(|a| crate::adapters::AdapterArg::parse(a).map(|a| a.path))
        .collect::<Result<_>>()?;
    match args.to {
        ToArg::Gguf => {
            if args
                .out
                .extension()
                .is_none_or(|e| !e.eq_ignore_ascii_case("gguf"))
            {
                bail!(
                    "--out {}: a GGUF adapter is a .gguf file (use --to peft for a PEFT directory)",
                    args.out.display()
                );
            }
            let mut all: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
            all.push(&base_path);
            crate::adapters::check_file_output(&args.out, args.force, &all)?;
            let base = Base::open(&base_path)?;
            let dtype = match args.dtype {
                DTypeArg::F32 => AdapterDType::F32,
                DTypeArg::F16 => AdapterDType::F16,
                DTypeArg::Bf16 => AdapterDType::BF16,
                DTypeArg::Q8_0 => AdapterDType::Q8_0,
            };
            let r = export(&adapter, &base, &args.out, dtype)?;
            say!(
                "wrote {} ({} LoRA pairs for general.architecture {}, adapter.lora.alpha {}, {:.2} MB) in {:.2} s",
                args.out.display(),
                r.modules,
                r.arch,
                r.alpha,
                r.bytes as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
            if r.folded > 0 {
                say!("note: {} module(s) scale other than alpha/r (rsLoRA or rank/alpha patterns): their scale is folded into lora_b, as llama.cpp applies one alpha per file", r.folded);
            }
            if r.fell_back > 0 {
                say!("note: {} tensor(s) written as f16: their rows are not whole 32-value q8_0 blocks", r.fell_back);
            }
            let base_size = std::fs::metadata(&base_path).map(|m| m.len()).unwrap_or(0);
            if lorakit_models::is_gguf(&base_path) && base_size > 0 {
                say!("run it: llama-cli -m {} --lora {}  (adapter {:.1} MB beside the {:.1} MB base)", base_path.display(), args.out.display(), r.bytes as f64 / 1e6, base_size as f64 / 1e6);
            }
        }
        ToArg::Peft => {
            if args.force && occupied(&args.out) {
                let mut protect = vec![Input::new("the base model", &base_path)];
                protect.extend(inputs.iter().map(|p| Input::new("an adapter", p)));
                check_replaceable(&args.out, &protect)?;
            }
            let names: Vec<String> = inputs
                .iter()
                .map(|p| format!("`{}`", p.display()))
                .collect();
            let card = Card {
                base_model: base_path.display().to_string(),
                license: None,
                made_by: format!(
                    "Written by `lorakit export --to peft` from {}.",
                    names.join(", ")
                ),
                sections: Vec::new(),
            };
            crate::adapters::save_peft(&adapter, &args.out, &card, "export", args.force)?;
            say!(
                "wrote {} ({} LoRA modules, PEFT format) in {:.2} s",
                args.out.display(),
                adapter.pairs().len(),
                start.elapsed().as_secs_f64()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
