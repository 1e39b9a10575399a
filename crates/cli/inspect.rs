//! `lorakit inspect MODEL`: architecture, parameter count and dtype, every linear module with its
//! shape, and which modules a LoRA target list would wrap.
use anyhow::{bail, Context, Result};
use lorakit_adapter::{Adapters, LoraConfig, ModuleSpec, TargetSelector};
use lorakit_models::ModelDir;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json + model.safetensors or shards + index).
    pub model: PathBuf,
    /// Comma-separated target modules (names or dotted suffixes), or `all-linear`.
    #[arg(long, value_delimiter = ',', conflicts_with = "target_regex")]
    pub target_modules: Option<Vec<String>>,
    /// A regex that must match a module's whole path.
    #[arg(long)]
    pub target_regex: Option<String>,
    /// Comma-separated modules never to wrap.
    #[arg(long, value_delimiter = ',')]
    pub exclude_modules: Option<Vec<String>>,
    /// Rank used to count LoRA parameters.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let dir = ModelDir::open(&args.model)?;
    let cfg = dir.config.clone();
    let params = dir.checkpoint.parameter_count();
    let dtype = dir.stored_dtype();
    let shards = dir.checkpoint.files().len();
    let linears = dir
        .linear_modules(Adapters::None)
        .with_context(|| format!("walking the model in {}", args.model.display()))?;

    let targets = match (&args.target_modules, &args.target_regex) {
        (Some(list), _) if list.len() == 1 && list[0].eq_ignore_ascii_case("all-linear") => {
            Some(ModuleSpec::Regex("all-linear".into()))
        }
        (Some(list), _) => Some(ModuleSpec::List(list.clone())),
        (None, Some(re)) => Some(ModuleSpec::Regex(re.clone())),
        (None, None) => None,
    };
    let selector = match &targets {
        Some(t) => {
            let config = LoraConfig {
                r: args.r,
                target_modules: Some(t.clone()),
                exclude_modules: args.exclude_modules.clone().map(ModuleSpec::List),
                ..Default::default()
            };
            config.validate("--target-modules")?;
            Some(TargetSelector::new(&config)?)
        }
        None => None,
    };
    let paths: Vec<String> = linears.iter().map(|l| l.path.clone()).collect();
    let wrapped: Vec<bool> = paths
        .iter()
        .map(|p| selector.as_ref().is_some_and(|s| s.matches(p)))
        .collect();
    let unmatched = selector
        .as_ref()
        .map(|s| {
            s.unmatched_entries(
                paths
                    .iter()
                    .zip(&wrapped)
                    .filter(|(_, w)| **w)
                    .map(|(p, _)| p.as_str()),
            )
        })
        .unwrap_or_default();
    let lora_params: usize = linears
        .iter()
        .zip(&wrapped)
        .filter(|(_, w)| **w)
        .map(|(l, _)| args.r * (l.in_dim + l.out_dim))
        .sum();

    if args.json {
        let modules: Vec<serde_json::Value> = linears
            .iter()
            .zip(&wrapped)
            .map(|(l, w)| {
                serde_json::json!({"path": l.path, "shape": [l.out_dim, l.in_dim], "bias": l.bias, "wrapped": w})
            })
            .collect();
        let v = serde_json::json!({
            "model": args.model.display().to_string(),
            "architecture": cfg.arch.name(),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "parameters": params,
            "dtype": format!("{dtype:?}").to_lowercase(),
            "files": shards,
            "linear_modules": modules,
            "lora_parameters": selector.as_ref().map(|_| lora_params),
            "unmatched_targets": unmatched,
        });
        say!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        say!("model:        {}", args.model.display());
        say!(
            "architecture: {} ({} layers, hidden {}, {} heads / {} kv heads, head dim {}, vocab {}{})",
            cfg.arch.name(),
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.vocab_size,
            if cfg.tie_word_embeddings { ", tied embeddings" } else { "" }
        );
        say!(
            "parameters:   {} ({:?}, {} file{})",
            group_digits(params),
            dtype,
            shards,
            if shards == 1 { "" } else { "s" }
        );
        say!("linear modules ({}), shape [out, in]:", linears.len());
        let width = paths.iter().map(String::len).max().unwrap_or(0);
        for (l, w) in linears.iter().zip(&wrapped) {
            let mark = if selector.is_some() {
                if *w {
                    "* "
                } else {
                    "  "
                }
            } else {
                ""
            };
            say!(
                "  {mark}{:width$}  [{}, {}]{}",
                l.path,
                l.out_dim,
                l.in_dim,
                if l.bias { " +bias" } else { "" }
            );
        }
        if selector.is_some() {
            let n = wrapped.iter().filter(|w| **w).count();
            say!(
                "LoRA would wrap {n} of {} linear modules (marked *): {} trainable parameters at r={} ({:.3}% of the model)",
                linears.len(),
                group_digits(lora_params),
                args.r,
                100.0 * lora_params as f64 / params.max(1) as f64
            );
        }
    }
    if !unmatched.is_empty() {
        bail!(
            "target entr{} {} matched no linear module of {} (see the list above)",
            if unmatched.len() == 1 { "y" } else { "ies" },
            unmatched
                .iter()
                .map(|u| format!("`{u}`"))
                .collect::<Vec<_>>()
                .join(", "),
            args.model.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// 1234567 → "1,234,567".
fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
