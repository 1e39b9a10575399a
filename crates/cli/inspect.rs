//! `lorakit inspect MODEL`: architecture, parameter count and dtype, every linear module with its
//! shape, and which modules a LoRA target list would wrap.
use anyhow::{bail, Context, Result};
use lorakit_adapter::{Adapters, LinearInfo, LoraConfig, ModuleSpec, TargetSelector};
use lorakit_models::gguf::GgufHeader;
use lorakit_models::BaseModel;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json + model.safetensors or shards + index), or a
    /// llama-architecture .gguf file (read from its header; modules named as in Hugging Face).
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

/// What inspect reports about a model, from a model directory or a GGUF file.
struct Summary {
    arch: String,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    tied: bool,
    params: usize,
    dtype: String,
    files: usize,
    linears: Vec<LinearInfo>,
}

fn summarize_dir(path: &Path) -> Result<Summary> {
    let model = BaseModel::open(path)?;
    let d = model.config.dimensions();
    let checkpoint = model
        .checkpoint()
        .context("expected a safetensors model directory")?;
    let params = checkpoint.parameter_count();
    let files = checkpoint.files().len();
    let dtype = format!("{:?}", model.stored_dtype());
    let arch = model.config.model_type().to_string();
    let linears = model
        .linear_modules(Adapters::None)
        .with_context(|| format!("walking the model in {}", path.display()))?;
    Ok(Summary {
        arch,
        layers: d.layers,
        hidden: d.hidden,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        vocab: d.vocab,
        tied: d.tied_embeddings,
        params,
        dtype,
        files,
        linears,
    })
}

/// A GGUF file, read from its header only; modules are named as in the Hugging Face release.
fn summarize_gguf(path: &Path) -> Result<Summary> {
    let h = GgufHeader::from_file(path)?;
    let arch = h
        .architecture()
        .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?
        .to_string();
    if h.tensors.is_empty() {
        bail!("{}: the GGUF file holds no tensors", path.display());
    }
    let declared = h
        .metadata
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.as_u64())
        .with_context(|| {
            format!(
                "{}: `{arch}.block_count`: missing or not an integer",
                path.display()
            )
        })?;
    lorakit_models::layer_count::check(
        declared,
        h.tensors.iter().map(|t| t.name.as_str()),
        path,
        &format!("{arch}.block_count"),
        "the file",
    )?;
    let mut linears = Vec::new();
    let mut params = 0usize;
    let mut vocab = 0;
    let mut types = std::collections::BTreeSet::new();
    for t in &h.tensors {
        params += t.dims.iter().product::<u64>() as usize;
        types.insert(t.ggml_type);
        let Some(name) = h.hf_name(&t.name) else {
            continue;
        };
        if name == "model.embed_tokens.weight" {
            vocab = t.dims.get(1).copied().unwrap_or(0) as usize;
        }
        let is_linear =
            t.dims.len() == 2 && !name.contains("embed_tokens") && !name.contains("norm");
        if let (true, Some(module)) = (is_linear, name.strip_suffix(".weight")) {
            linears.push(LinearInfo {
                path: module.into(),
                in_dim: t.dims[0] as usize,
                out_dim: t.dims[1] as usize,
                bias: false,
                lora: None,
            });
        }
    }
    // the dimensions as the model is built: config.json as transformers would write it
    let config = lorakit_models::registry::parse_config(
        lorakit_models::gguf::hf_config_json(&h, path)?,
        path,
    )?;
    let d = config.dimensions();
    let tied = d.tied_embeddings;
    if tied {
        linears.push(LinearInfo {
            path: "lm_head".into(),
            in_dim: d.hidden,
            out_dim: vocab,
            bias: false,
            lora: None,
        });
    }
    Ok(Summary {
        arch: config.model_type().to_string(),
        layers: d.layers,
        hidden: d.hidden,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        vocab,
        tied,
        params,
        dtype: format!("GGUF v{}, ggml types {:?}", h.version, types),
        files: 1,
        linears,
    })
}

pub fn run(mut args: Args) -> Result<ExitCode> {
    args.model = lorakit_models::hub::resolve(&args.model)?;
    let m = if lorakit_models::is_gguf(&args.model) {
        summarize_gguf(&args.model)?
    } else {
        summarize_dir(&args.model)?
    };
    let (params, dtype, shards) = (m.params, m.dtype.clone(), m.files);
    let linears = m.linears.clone();
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
            "architecture": m.arch,
            "layers": m.layers,
            "hidden_size": m.hidden,
            "attention_heads": m.heads,
            "kv_heads": m.kv_heads,
            "vocab_size": m.vocab,
            "tie_word_embeddings": m.tied,
            "parameters": params,
            "dtype": dtype.to_lowercase(),
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
            m.arch,
            m.layers,
            m.hidden,
            m.heads,
            m.kv_heads,
            m.head_dim,
            m.vocab,
            if m.tied { ", tied embeddings" } else { "" }
        );
        say!(
            "parameters:   {} ({}, {} file{})",
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
