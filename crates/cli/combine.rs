//! `lorakit combine --adapter A[:W] --adapter B[:W] ... --method cat|linear|svd --out DIR`:
//! several adapters of one base model as one PEFT adapter (see `lorakit_adapter::combine`).
use anyhow::{bail, Result};
use lorakit_adapter::card::Card;
use lorakit_adapter::combine::{combine, Method};
use lorakit_adapter::output_guard::{check_replaceable, occupied, Input};
use lorakit_adapter::PeftAdapter;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// Exact: rank = the sum of the ranks.
    Cat,
    /// PEFT's linear: same ranks only; an approximation (cross terms), as in PEFT.
    Linear,
    /// The best rank-`--rank` approximation of the weighted sum.
    Svd,
}

#[derive(clap::Args)]
pub struct Args {
    /// An adapter (PEFT directory or .gguf adapter), optionally `:WEIGHT` (default 1). Repeat.
    #[arg(long, required = true)]
    pub adapter: Vec<String>,
    #[arg(long, value_enum, default_value = "cat")]
    pub method: MethodArg,
    /// Rank of the result for `svd` (default: the largest input rank).
    #[arg(long)]
    pub rank: Option<usize>,
    /// The base model; needed for .gguf adapters (their names and row order), else recorded in
    /// the card.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Output directory (PEFT format).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace OUT if lorakit made it and it holds none of the inputs.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let start = std::time::Instant::now();
    if args.rank.is_some() && args.method != MethodArg::Svd {
        bail!("--rank applies to --method svd");
    }
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let specs: Vec<crate::adapters::AdapterArg> = args
        .adapter
        .iter()
        .map(|a| crate::adapters::AdapterArg::parse(a))
        .collect::<Result<_>>()?;
    if args.force && occupied(&args.out) {
        let protect: Vec<Input> = specs
            .iter()
            .map(|s| Input::new("an adapter", &s.path))
            .collect();
        check_replaceable(&args.out, &protect)?;
    }
    let base = args
        .base
        .as_deref()
        .map(lorakit_models::hub::resolve)
        .transpose()?;
    let loaded: Vec<PeftAdapter> = specs
        .iter()
        .map(|s| match &base {
            Some(b) => crate::adapters::load_one(&s.path, b),
            None if lorakit_export::adapter_gguf::is_gguf_adapter(&s.path) => {
                bail!(
                    "{}: a GGUF adapter; pass --base MODEL so lorakit can name its modules",
                    s.path.display()
                )
            }
            None => crate::adapters::load_one(&s.path, &s.path),
        })
        .collect::<Result<_>>()?;
    let method = match args.method {
        MethodArg::Cat => Method::Cat,
        MethodArg::Linear => Method::Linear,
        MethodArg::Svd => Method::Svd,
    };
    let inputs: Vec<(&PeftAdapter, f64)> = loaded
        .iter()
        .zip(&specs)
        .map(|(a, s)| (a, s.weight))
        .collect();
    let combined = combine(&inputs, method, args.rank, &args.out)?;
    let base_name = base
        .map(|b| b.display().to_string())
        .or_else(|| loaded[0].config.base_model_name_or_path.clone())
        .unwrap_or_else(|| "unknown".into());
    let list: Vec<String> = specs
        .iter()
        .map(|s| {
            format!(
                "| `{}` | {} | {} |",
                s.path.display(),
                s.weight,
                loaded
                    .iter()
                    .zip(&specs)
                    .find(|(_, x)| x.path == s.path)
                    .map(|(a, _)| a.config.r)
                    .unwrap_or(0)
            )
        })
        .collect();
    let card = Card {
        base_model: base_name,
        license: None,
        made_by: format!(
            "Combined by `lorakit combine --method {}` (PEFT's `add_weighted_adapter` semantics).",
            method.name()
        ),
        sections: vec![(
            "Inputs".into(),
            format!(
                "| adapter | weight | r |\n|---|---|---|\n{}",
                list.join("\n")
            ),
        )],
    };
    crate::adapters::save_peft(&combined, &args.out, &card, "combine", args.force)?;
    say!(
        "wrote {} ({} of {} adapters: {} modules, r {}) in {:.2} s",
        args.out.display(),
        method.name(),
        loaded.len(),
        combined.pairs().len(),
        combined.config.r,
        start.elapsed().as_secs_f64()
    );
    if method == Method::Linear && loaded.len() > 1 {
        crate::warn("`linear` (as PEFT) mixes A and B separately: the result is not the weighted sum of the updates (use `cat`, exact, or `svd`)");
    }
    Ok(ExitCode::SUCCESS)
}
