//! The streaming merge: `W' = W + s·B·A` computed in f32 and rounded once to the output dtype,
//! one tensor at a time, over the base's own shard layout. Works on tensor names only.
use crate::error::{MergeError, Result};
use candle_core::{DType, Device, Tensor};
use lorakit_adapter::checkpoint::{INDEX_FILE, SINGLE_FILE};
use lorakit_adapter::fsutil::{atomic_write, AtomicDir};
use lorakit_adapter::output_guard::{self, Input};
use lorakit_adapter::peft_format::lora_key;
use lorakit_adapter::safetensors_writer::{index_json, Planned, StreamWriter};
use lorakit_adapter::target::ALL_LINEAR;
use lorakit_adapter::{AdapterError, Checkpoint, ModuleSpec, PeftAdapter, TargetSelector};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The output dtype of merged float tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDType {
    /// Each tensor keeps the base's dtype.
    Auto,
    Fixed(DType),
}

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub dtype: OutDType,
    /// Replace an existing non-empty output directory, if lorakit made it and it holds none of
    /// the inputs (see `lorakit_adapter::output_guard`).
    pub force: bool,
}

/// A merged model complete under a temporary name next to its destination, not yet in place:
/// check it at [`path`](PendingMerge::path), then [`commit`](PendingMerge::commit) it. Dropped
/// uncommitted, it is removed and the destination keeps what it held.
pub struct PendingMerge {
    dir: AtomicDir,
    summary: MergeSummary,
}

impl PendingMerge {
    /// The finished model directory, under its temporary name.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn summary(&self) -> &MergeSummary {
        &self.summary
    }

    /// Moves the model into place (replacing the old output when `force` allowed it).
    pub fn commit(self) -> Result<MergeSummary> {
        self.dir.commit()?;
        Ok(self.summary)
    }
}

/// What a merge did.
#[derive(Clone, Debug)]
pub struct MergeSummary {
    pub out: PathBuf,
    /// Base tensors that received a LoRA update.
    pub merged: Vec<String>,
    /// Base tensors replaced whole (`modules_to_save`).
    pub replaced: Vec<String>,
    pub tensors: usize,
    pub shards: usize,
    pub bytes: usize,
    /// The output head was tied to the embeddings and is now stored on its own.
    pub untied: Option<String>,
}

/// Files never copied from the base directory: weights in any format (we write our own).
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".gguf",
        ".h5",
        ".msgpack",
        ".ckpt",
        ".onnx",
    ]
    .iter()
    .any(|ext| name.ends_with(ext))
        || name == INDEX_FILE
        || name.ends_with(".index.json")
}

/// Where each adapted tensor's update comes from.
enum Source {
    /// The base tensor itself.
    Base,
    /// A tied output head: the base embedding `from`, stored under a new name.
    TiedFrom(String),
}

/// Merges `adapter` into the model at `base_dir`, writing a complete model directory at `out`.
pub fn merge(
    base_dir: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    merge_pending(base_dir, adapter, out, opts)?.commit()
}

/// [`merge`] up to the last step: the model is written under a temporary name and returned
/// for checking before it takes `out`'s place.
pub fn merge_pending(
    base_dir: &Path,
    adapter: &PeftAdapter,
    out: &Path,
    opts: &MergeOptions,
) -> Result<PendingMerge> {
    if opts.force && output_guard::occupied(out) {
        output_guard::check_replaceable(
            out,
            &[
                Input::new("the base model", base_dir),
                Input::new("the adapter", &adapter.dir),
            ],
        )?;
    }
    let base = Checkpoint::open_dir(base_dir)?;
    let config_path = base_dir.join("config.json");
    let mut config: serde_json::Value = {
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| MergeError::io(&config_path, e))?;
        serde_json::from_str(&text).map_err(|e| MergeError::Json {
            path: config_path.clone(),
            message: e.to_string(),
        })?
    };

    // Which modules store `[in, out]` weights (GPT-2's Conv1D): the model's config knows; for an
    // architecture lorakit does not build, the adapter's `fan_in_fan_out` says, as in PEFT.
    let model_config = lorakit_models::registry::parse_config(config.clone(), &config_path).ok();
    let transposed = |module: &str| match &model_config {
        Some(c) => c.stores_transposed(module),
        None => adapter.config.fan_in_fan_out,
    };
    // Every adapted module resolved to a base tensor, and checked, before writing anything.
    let plan = plan_updates(&base, &config, adapter)?;
    check_fits(&base, adapter, &plan, &transposed)?;
    let Plan { updates, untied } = plan;
    let dev = Device::Cpu;

    let out_dtype = |stored: DType| match opts.dtype {
        OutDType::Fixed(d) if stored.is_float() => d,
        _ => stored,
    };

    let dir = AtomicDir::create(out, opts.force)?;
    let sharded = base_dir.join(INDEX_FILE).is_file();
    let files = base.files();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    let mut merged = Vec::new();
    let mut replaced = Vec::new();
    let mut tensors = 0usize;
    let n_files = files.len();
    for (i, (path, names)) in files.iter().enumerate() {
        let file_name = if sharded {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            SINGLE_FILE.to_string()
        };
        let mut names = names.clone();
        // a newly untied head goes into the last shard
        if i + 1 == n_files {
            if let Some(u) = &untied {
                names.push(u.clone());
            }
        }
        let mut plan = Vec::with_capacity(names.len());
        for n in &names {
            let meta = match updates.get(n) {
                Some((_, Source::TiedFrom(e))) => base.meta(e)?,
                _ => base.meta(n)?,
            };
            let dtype = out_dtype(meta.dtype);
            total += meta.shape.iter().product::<usize>() * dtype.size_in_bytes();
            plan.push(Planned {
                name: n.clone(),
                dtype,
                shape: meta.shape,
            });
        }
        let mut w = StreamWriter::create(&dir.path().join(&file_name), plan, &[])?;
        for n in &names {
            let update = updates.get(n);
            let replacement = adapter.replacements().get(n);
            if update.is_none() && replacement.is_none() {
                let meta = base.meta(n)?;
                if out_dtype(meta.dtype) == meta.dtype {
                    w.write_raw(n, base.bytes(n)?)?;
                } else {
                    w.write_tensor(n, &base.load(n, &dev)?)?;
                }
            } else {
                if replacement.is_some() {
                    replaced.push(n.clone());
                }
                if update.is_some() {
                    merged.push(n.clone());
                }
                let t = changed_tensor(&base, adapter, n, update, replacement, &transposed)?;
                w.write_tensor(n, &t)?;
            }
            weight_map.insert(n.clone(), file_name.clone());
            tensors += 1;
        }
        w.finish()?;
    }
    if sharded {
        let index = serde_json::to_vec_pretty(&index_json(&weight_map, total))
            .map_err(|e| MergeError::io(INDEX_FILE, e))?;
        atomic_write(&dir.path().join(INDEX_FILE), &index)?;
    }

    update_config(&mut config, opts.dtype, untied.is_some());
    let text = serde_json::to_vec_pretty(&config).map_err(|e| MergeError::io(&config_path, e))?;
    atomic_write(&dir.path().join("config.json"), &text)?;
    copy_side_files(base_dir, dir.path())?;
    output_guard::write_marker(dir.path(), "merge")?;
    Ok(PendingMerge {
        dir,
        summary: MergeSummary {
            out: out.to_path_buf(),
            merged,
            replaced,
            tensors,
            shards: n_files,
            bytes: total,
            untied,
        },
    })
}

/// A tensor the merge changes, in f32: the adapter's replacement or the base tensor (for a tied
/// head, the embedding it shares), with the module's update folded in by its LoRA variant — in
/// the `[out, in]` layout the update has, for a weight stored `[in, out]` (`transposed`).
fn changed_tensor(
    base: &Checkpoint,
    adapter: &PeftAdapter,
    name: &str,
    update: Option<&(String, Source)>,
    replacement: Option<&Tensor>,
    transposed: &dyn Fn(&str) -> bool,
) -> Result<Tensor> {
    let dev = Device::Cpu;
    let src = match update {
        Some((_, Source::TiedFrom(e))) => e.as_str(),
        _ => name,
    };
    let mut t = match replacement {
        Some(r) => r.clone(),
        None => base.load(src, &dev)?.to_dtype(DType::F32)?,
    };
    if let Some((module, _)) = update {
        let flip = transposed(module);
        if flip {
            t = t.t()?.contiguous()?;
        }
        let (out_dim, in_dim) = t.dims2()?;
        // every planned module has its pair: `check_fits` read each one
        if let Some(l) = adapter.low_rank(module, in_dim, out_dim, &dev)? {
            t = l.merged_weight(&t)?;
        }
        if flip {
            t = t.t()?.contiguous()?;
        }
    }
    check_finite(name, &t)?;
    Ok(t)
}

/// config.json of the merged model: the new dtype, and the head untied if it is stored apart.
fn update_config(config: &mut serde_json::Value, dtype: OutDType, untied: bool) {
    let Some(obj) = config.as_object_mut() else {
        return;
    };
    if let OutDType::Fixed(d) = dtype {
        let name = match d {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        let key = if obj.contains_key("dtype") || !obj.contains_key("torch_dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(key.into(), name.into());
    }
    if untied {
        obj.insert("tie_word_embeddings".into(), false.into());
    }
}

/// Where each adapted module's merged weight comes from, and the output head to untie.
struct Plan {
    /// out name -> (module, source)
    updates: BTreeMap<String, (String, Source)>,
    untied: Option<String>,
}

/// Resolves every module the adapter holds to a base tensor: its own weight, or the embedding
/// a tied output head shares (which the merged model then stores apart).
fn plan_updates(
    base: &Checkpoint,
    config: &serde_json::Value,
    adapter: &PeftAdapter,
) -> Result<Plan> {
    let mut updates: BTreeMap<String, (String, Source)> = BTreeMap::new(); // out name -> (module, source)
    let mut untied = None;
    for module in adapter.modules() {
        let name = format!("{module}.weight");
        if base.contains(&name) {
            updates.insert(name, (module.to_string(), Source::Base));
        } else if let Some(embed) = tied_embedding(base, config, module, adapter)? {
            untied = Some(name.clone());
            updates.insert(name, (module.to_string(), Source::TiedFrom(embed)));
        } else {
            return Err(MergeError::NoBaseWeight {
                adapter: adapter.weights_file(),
                module: module.to_string(),
                base: base.describe(),
            });
        }
    }
    // A changed output head of a model that declares tied embeddings must be untied, or loaders
    // would re-tie it to the (unchanged) embeddings and drop the update.
    let ties = config.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(true);
    if untied.is_none() && ties {
        untied = updates
            .keys()
            .find(|n| n.ends_with("lm_head.weight"))
            .cloned();
    }
    Ok(Plan { updates, untied })
}

/// The adapter fits the base: replaced tensors exist, every low-rank pair has its base
/// tensor's shape, and every module the config targets has its tensors (as when the adapter is
/// loaded to run).
fn check_fits(
    base: &Checkpoint,
    adapter: &PeftAdapter,
    plan: &Plan,
    transposed: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let dev = Device::Cpu;
    let updates = &plan.updates;
    for name in adapter.replacements().keys() {
        if !base.contains(name) && !updates.contains_key(name) {
            return Err(MergeError::NoBaseWeight {
                adapter: adapter.weights_file(),
                module: name.trim_end_matches(".weight").to_string(),
                base: base.describe(),
            });
        }
    }
    // Shapes: check each low-rank pair against its base tensor now, not halfway through.
    for (name, (module, source)) in updates {
        let src = match source {
            Source::Base => name.as_str(),
            Source::TiedFrom(e) => e.as_str(),
        };
        let shape = base.meta(src)?.shape;
        let [mut out_dim, mut in_dim] = shape[..] else {
            return Err(MergeError::NoBaseWeight {
                adapter: adapter.weights_file(),
                module: module.clone(),
                base: format!("{} (`{src}` is not a matrix)", base.describe()),
            });
        };
        if transposed(module) {
            std::mem::swap(&mut out_dim, &mut in_dim);
        }
        adapter.low_rank(module, in_dim, out_dim, &dev)?;
    }
    // Every module the config targets must have its tensors, as when the adapter is loaded to
    // run (`eval`, `generate`); the base's 2-D `.weight` tensors stand for its linear modules
    // (with `all-linear`, embeddings are not linear modules).
    if adapter.config.target_modules.is_some() {
        let selector = TargetSelector::new(&adapter.config)?;
        let all_linear = matches!(&adapter.config.target_modules,
            Some(ModuleSpec::Regex(s)) if s.eq_ignore_ascii_case(ALL_LINEAR));
        let have: BTreeSet<&str> = adapter.modules().collect();
        for module in base.names().filter_map(|n| n.strip_suffix(".weight")) {
            let is_matrix = base
                .meta(&format!("{module}.weight"))
                .is_ok_and(|m| m.shape.len() == 2);
            let embedding =
                module.contains("embed") || module.ends_with("wte") || module.ends_with("wpe");
            if is_matrix
                && !(all_linear && embedding)
                && selector.matches(module)
                && !have.contains(module)
            {
                return Err(AdapterError::MissingTensor {
                    file: adapter.weights_file(),
                    name: lora_key(module, "A"),
                    why: "adapter_config.json targets this module".into(),
                }
                .into());
            }
        }
    }

    Ok(())
}

/// For an adapted module with no weight of its own (a tied output head), the embedding tensor it
/// shares: the only 2-D float tensor with "embed" or "wte" in its name whose shape fits.
fn tied_embedding(
    base: &Checkpoint,
    config: &serde_json::Value,
    module: &str,
    adapter: &PeftAdapter,
) -> Result<Option<String>> {
    if config.get("tie_word_embeddings").and_then(|v| v.as_bool()) == Some(false) {
        return Ok(None);
    }
    if !module.ends_with("lm_head") {
        return Ok(None);
    }
    let candidates: BTreeSet<String> = base
        .names()
        .filter(|n| (n.contains("embed") || n.contains("wte")) && n.ends_with(".weight"))
        .map(String::from)
        .collect();
    let fits: Vec<String> = candidates
        .into_iter()
        .filter(|n| {
            base.meta(n)
                .map(|m| {
                    m.shape.len() == 2
                        && adapter
                            .low_rank(module, m.shape[1], m.shape[0], &Device::Cpu)
                            .is_ok()
                })
                .unwrap_or(false)
        })
        .collect();
    Ok(if fits.len() == 1 {
        fits.into_iter().next()
    } else {
        None
    })
}

fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let m = t
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if !m.is_finite() {
        return Err(MergeError::NonFinite { name: name.into() });
    }
    Ok(())
}

/// Copies config-like files (tokenizer, generation config, chat template, ...) as they are.
fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    let entries = std::fs::read_dir(from).map_err(|e| MergeError::io(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| MergeError::io(from, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.path().is_file()
            || is_weight_file(&name)
            || name == "config.json"
            || name.starts_with('.')
        {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).map_err(|e| MergeError::io(entry.path(), e))?;
    }
    Ok(())
}
