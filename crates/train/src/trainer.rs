//! The training loop: seeded shuffling, gradient accumulation, global-norm clipping, AdamW with
//! a warmup schedule, periodic eval with best-adapter keeping and early stopping, checkpoints
//! and exact resume.
use crate::checkpoint::{self, TrainState};
use crate::data::{self, Dataset};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate, EvalResult};
use crate::loss::Batch;
use crate::metrics::{self, MetricsRow};
use crate::optim::{clip_grad_norm, AdamW};
use crate::packing;
use crate::preference::{self, Pair, PairMeans, PairStats, PreferenceLoss, PreferenceSet};
use crate::recipe::Recipe;
use crate::recipe::{DataFormat, Task};
use crate::recipe::{Objective, ReferenceLogps};
use crate::runtime;
use crate::schedule::lr_at;
use crate::task_model::TaskModel;
use crate::tokenizer::TextTokenizer;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use lorakit_adapter::fsutil::AtomicDir;
use lorakit_adapter::output_guard::{self, Input};
use lorakit_adapter::{save_adapter_with, AdapterError, Adapters, LoraConfig, StepSeed};
use lorakit_models::{BaseModel, Task as ModelTask};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One logged optimizer step.
#[derive(Clone, Debug)]
pub struct StepReport {
    pub step: usize,
    pub total: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    /// Real tokens (scored and context, never padding) per second.
    pub tokens_per_s: f64,
    pub examples_per_s: f64,
    pub grad_norm: f64,
    /// Preference objectives: the step's reward figures.
    pub rewards: Option<PairMeans>,
}

/// Receives progress; the CLI draws a bar or prints lines.
pub trait Reporter {
    fn start(&mut self, _total_steps: usize, _resumed_at: usize) {}
    fn message(&mut self, _text: &str) {}
    fn step(&mut self, _r: &StepReport) {}
    fn eval(&mut self, _step: usize, _r: &EvalResult, _best: bool) {}
    fn finish(&mut self) {}
}

pub struct TrainOptions {
    pub resume: bool,
    /// Start over: remove an existing output directory first — only one lorakit made, never
    /// one that is, holds or lies inside an input (see `lorakit_adapter::output_guard`).
    pub force: bool,
    /// The recipe's file, when it came from one: an input `--force` must never delete.
    pub recipe_file: Option<PathBuf>,
    /// Set (e.g. by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub seconds: f64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub best_eval: Option<(usize, f64)>,
    pub adapter_dir: PathBuf,
    pub adapter_bytes: u64,
    pub interrupted: bool,
    pub stopped_early: bool,
    pub train_examples: usize,
    pub eval_examples: usize,
    pub truncated: usize,
    /// Share of token slots that are padding, with and without packing (token data only).
    pub padding: Option<Padding>,
    /// The process's peak resident memory (Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// Share of the token slots of an epoch's batches that are padding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Padding {
    pub unpacked: f64,
    pub packed: f64,
}

/// Seeded Fisher–Yates permutation of `0..n` (SplitMix64 stream).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Loads data, returning (train, eval).
fn datasets(
    recipe: &Recipe,
    tok: &TextTokenizer,
    labels: &[String],
) -> Result<(Dataset, Option<Dataset>)> {
    let d = &recipe.data;
    let read = |p: &Path| -> Result<Dataset> {
        if d.format == DataFormat::Classification {
            data::load_labelled(p, tok, d.max_seq_len, labels)
        } else {
            data::load(p, d.format, tok, d.max_seq_len, d.train_on_inputs)
        }
    };
    let mut train = read(&d.train)?;
    let eval = match (&d.eval, d.eval_split) {
        (Some(p), _) => Some(read(p)?),
        (None, Some(frac)) => Some(Dataset {
            examples: split_off_eval(&mut train.examples, frac, recipe)?,
            truncated: 0,
            dropped: 0,
        }),
        _ => None,
    };
    Ok((train, eval))
}

/// Moves a seeded `frac` of `items` (at least one, leaving at least one) out for evaluation.
fn split_off_eval<T>(items: &mut Vec<T>, frac: f64, recipe: &Recipe) -> Result<Vec<T>> {
    let n = items.len();
    if n < 2 {
        return Err(TrainError::InvalidRecipe {
            file: recipe.data.train.display().to_string(),
            field: "data.eval_split".into(),
            message: "needs at least 2 examples".into(),
        });
    }
    let k = ((n as f64 * frac).round() as usize).clamp(1, n - 1);
    let order = permutation(n, recipe.train.seed ^ 0xe7a1);
    let mut all: Vec<Option<T>> = items.drain(..).map(Some).collect();
    let eval: Vec<T> = order[..k].iter().filter_map(|i| all[*i].take()).collect();
    *items = all.into_iter().flatten().collect();
    Ok(eval)
}

/// Loads preference pairs, returning (train, eval).
fn preference_sets(
    recipe: &Recipe,
    tok: &TextTokenizer,
) -> Result<(PreferenceSet, Option<PreferenceSet>)> {
    let d = &recipe.data;
    let mut train = preference::load(&d.train, tok, d.max_seq_len)?;
    let eval = match (&d.eval, d.eval_split) {
        (Some(p), _) => Some(preference::load(p, tok, d.max_seq_len)?),
        (None, Some(frac)) => Some(PreferenceSet {
            pairs: split_off_eval(&mut train.pairs, frac, recipe)?,
            truncated: 0,
        }),
        _ => None,
    };
    Ok((train, eval))
}

/// A run's data: tokenised examples in rows (one each, or packed), or preference pairs with
/// the reference's log-probabilities when DPO computes them once.
enum RunData {
    Tokens {
        train: Dataset,
        eval: Option<Dataset>,
        rows: Vec<packing::Row>,
    },
    Pairs {
        train: PreferenceSet,
        eval: Option<PreferenceSet>,
        /// Per training pair, (chosen, rejected) reference log-probabilities.
        reference: Option<Vec<(f32, f32)>>,
    },
}

impl RunData {
    /// What an epoch shuffles and a batch counts: rows, or pairs.
    fn units(&self) -> usize {
        match self {
            RunData::Tokens { rows, .. } => rows.len(),
            RunData::Pairs { train, .. } => train.pairs.len(),
        }
    }

    fn train_examples(&self) -> usize {
        match self {
            RunData::Tokens { train, .. } => train.examples.len(),
            RunData::Pairs { train, .. } => train.pairs.len(),
        }
    }

    fn eval_examples(&self) -> usize {
        match self {
            RunData::Tokens { eval, .. } => eval.as_ref().map(|d| d.examples.len()).unwrap_or(0),
            RunData::Pairs { eval, .. } => eval.as_ref().map(|d| d.pairs.len()).unwrap_or(0),
        }
    }

    fn truncated(&self) -> (usize, usize) {
        match self {
            RunData::Tokens { train, eval, .. } => (
                train.truncated,
                eval.as_ref().map(|d| d.truncated).unwrap_or(0),
            ),
            RunData::Pairs { train, eval, .. } => (
                train.truncated,
                eval.as_ref().map(|d| d.truncated).unwrap_or(0),
            ),
        }
    }

    fn has_eval(&self) -> bool {
        self.eval_examples() > 0
    }
}

/// One micro-batch of a step.
enum Micro<'a> {
    Tokens(Batch),
    Pairs {
        pairs: Vec<&'a Pair>,
        /// `[2·pairs]` reference log-probabilities (DPO), chosen then rejected.
        reference: Option<Tensor>,
    },
}

impl Micro<'_> {
    fn tokens(&self) -> usize {
        match self {
            Micro::Tokens(b) => b.tokens,
            Micro::Pairs { pairs, .. } => pairs
                .iter()
                .map(|p| 2 * p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum(),
        }
    }

    fn examples(&self) -> usize {
        match self {
            Micro::Tokens(b) => b.examples,
            Micro::Pairs { pairs, .. } => pairs.len(),
        }
    }
}

/// Optimizer steps in one pass over `examples` examples: micro-batches of `batch_size`, grouped
/// `grad_accum_steps` to a step (the last group of an epoch may be short).
fn steps_per_epoch(examples: usize, t: &crate::recipe::TrainSection) -> usize {
    examples.div_ceil(t.batch_size).div_ceil(t.grad_accum_steps)
}

/// What `prepare_output` found in `output.dir`: the checkpoint to resume from, and whether an
/// earlier run must be removed first.
struct OutputPlan {
    latest: Option<PathBuf>,
    start_over: bool,
}

/// Stage 1, before anything is written: the directory is not another run's, `--resume` has a
/// checkpoint, `--force` replaces only what it may (`lorakit_adapter::output_guard`).
fn prepare_output(recipe: &Recipe, opts: &TrainOptions, model_path: &Path) -> Result<OutputPlan> {
    let out = &recipe.output.dir;
    if let Some(pid) = crate::run_lock::holder(out) {
        return Err(TrainError::io(
            out,
            format!(
                "in use by another lorakit train (pid {pid}); wait for it to finish or stop it"
            ),
        ));
    }
    let latest = if opts.resume {
        checkpoint::latest(out)?
    } else {
        None
    };
    if opts.resume && latest.is_none() {
        return Err(TrainError::Resume(format!(
            "--resume: no checkpoint in {}/checkpoints to resume from",
            out.display()
        )));
    }
    let start_over = !opts.resume && lorakit_adapter::fsutil::is_non_empty_dir(out);
    if start_over {
        if !opts.force {
            return Err(TrainError::io(out, "output.dir already exists and is not empty: pass --resume to continue that run, --force to start over, or choose another output.dir"));
        }
        let mut inputs = vec![
            Input::new("the model", model_path),
            Input::new("the training data", &recipe.data.train),
        ];
        if let Some(e) = &recipe.data.eval {
            inputs.push(Input::new("the eval data", e));
        }
        if let Some(r) = &opts.recipe_file {
            inputs.push(Input::new("the recipe", r));
        }
        output_guard::check_replaceable(out, &inputs)?;
    }
    Ok(OutputPlan { latest, start_over })
}

/// Stage 2: the training state to start from — fresh, or a checkpoint's adapter tensors (into
/// `varmap`), optimizer moments and counters, checked against this recipe and data.
fn initial_state(
    recipe: &Recipe,
    latest: Option<&Path>,
    train_examples: usize,
    varmap: &VarMap,
    device: &candle_core::Device,
    reporter: &mut dyn Reporter,
) -> Result<(TrainState, Option<crate::checkpoint::OptimizerState>)> {
    let t = &recipe.train;
    let lora_json = serde_json::to_value(&recipe.lora).unwrap_or_default();
    let fresh = TrainState {
        step: 0,
        epoch: 0,
        step_in_epoch: 0,
        best_eval_loss: None,
        best_step: None,
        evals_since_best: 0,
        stopped_early: false,
        lora: lora_json.clone(),
        seed: t.seed,
    };
    let Some(ck) = latest else {
        return Ok((fresh, None));
    };
    let checkpoint::SavedStep {
        adapter,
        optimizer,
        state: st,
    } = checkpoint::load(ck)?;
    let per_epoch = steps_per_epoch(train_examples, t);
    checkpoint::check_state(
        &st,
        ck,
        per_epoch,
        t.max_steps.unwrap_or(t.epochs * per_epoch),
    )?;
    if st.lora != lora_json || st.seed != t.seed {
        return Err(TrainError::Resume(format!("{}: the checkpoint was made with a different lora: block or seed than this recipe; resume with the recipe that started the run (saved as {}/recipe.yaml)", ck.display(), recipe.output.dir.display())));
    }
    let mut vars = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    for (k, v) in adapter {
        vars.insert(k, Var::from_tensor(&v.to_device(device)?)?);
    }
    drop(vars);
    reporter.message(&format!(
        "resuming from {} (step {})",
        ck.display(),
        st.step
    ));
    Ok((st, Some(optimizer)))
}

/// Stage 3, once every input is known good: the output directory, marked and locked, with the
/// recipe and a metrics file that continues (resume) or starts over.
fn open_output(
    recipe: &Recipe,
    plan: &OutputPlan,
    resume_step: Option<usize>,
    reporter: &mut dyn Reporter,
) -> Result<crate::run_lock::RunLock> {
    let out = &recipe.output.dir;
    if plan.start_over {
        output_guard::remove_replaced(out)?;
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    // marked before anything else is written, so a run killed at any point leaves a directory
    // that is either empty or one `--force` may replace
    output_guard::write_marker(out, "train")?;
    let (lock, notes) = crate::run_lock::RunLock::acquire(out)?;
    for n in notes {
        reporter.message(&n);
    }
    lorakit_adapter::fsutil::atomic_write(&out.join("recipe.yaml"), recipe.to_yaml().as_bytes())?;
    let metrics_path = out.join("metrics.jsonl");
    match resume_step {
        Some(step) => metrics::truncate_after(&metrics_path, step)?,
        None => {
            let _ = std::fs::remove_file(&metrics_path);
        }
    }
    Ok(lock)
}

/// One optimizer step's figures.
struct StepOutcome {
    loss: f64,
    grad_norm: f64,
    tokens: usize,
    examples: usize,
    /// Preference objectives: the step's pair figures.
    pairs: Option<PairStats>,
}

/// How a micro-batch's loss is computed.
struct Objectives<'a> {
    preference: PreferenceLoss,
    pad_id: u32,
    device: &'a candle_core::Device,
}

/// Stage 4: one optimizer step over a group of micro-batches — forward and backward per
/// micro-batch (dropout seeded by step and micro-batch), gradients summed and normalised by the
/// group's target count, clipped, then AdamW at `lr`.
#[allow(clippy::too_many_arguments)]
fn optimizer_step(
    model: &TaskModel,
    opt: &mut AdamW,
    batches: &[Micro],
    objectives: &Objectives,
    t: &crate::recipe::TrainSection,
    step: usize,
    lr: f64,
    dropout_seed: &StepSeed,
    checked_grads: &mut bool,
) -> Result<StepOutcome> {
    let targets: usize = batches
        .iter()
        .map(|b| match b {
            Micro::Tokens(b) => b.targets,
            Micro::Pairs { .. } => 0,
        })
        .sum::<usize>()
        .max(1);
    let (pairs, chosen_tokens) = batches.iter().fold((0, 0), |(n, c), b| match b {
        Micro::Pairs { pairs, .. } => (
            n + pairs.len(),
            c + pairs.iter().map(|p| p.chosen.len()).sum::<usize>(),
        ),
        Micro::Tokens(_) => (n, c),
    });
    let tokens: usize = batches.iter().map(Micro::tokens).sum();
    let examples: usize = batches.iter().map(Micro::examples).sum();
    let var_tensors = opt.tensors();
    let mut acc: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
    let mut loss_sum = 0f64;
    let mut pair_stats: Option<PairStats> = None;
    for (mi, batch) in batches.iter().enumerate() {
        dropout_seed.set(t.seed, step as u64, mi as u64);
        let (loss, grads) = match batch {
            Micro::Tokens(batch) => model.loss_and_grads(
                batch,
                1.0 / targets as f64,
                t.gradient_checkpointing,
                &var_tensors,
            )?,
            Micro::Pairs {
                pairs: p,
                reference,
            } => {
                let lm = model.causal_lm().ok_or_else(|| {
                    candle_core::Error::Msg("preference tuning needs a causal LM".into())
                })?;
                let out = objectives.preference.apply(
                    lm,
                    p,
                    reference.as_ref(),
                    objectives.pad_id,
                    true,
                    1.0 / pairs.max(1) as f64,
                    1.0 / chosen_tokens.max(1) as f64,
                    objectives.device,
                )?;
                pair_stats.get_or_insert_default().add(&out.stats);
                let store = out.loss.backward()?;
                let grads = var_tensors.iter().map(|v| store.get(v).cloned()).collect();
                (out.loss.to_scalar::<f32>()?, grads)
            }
        };
        loss_sum += loss as f64;
        if !*checked_grads {
            let missing = opt.missing_grads(&grads);
            if !missing.is_empty() {
                return Err(AdapterError::DeadAdapters { names: missing }.into());
            }
            *checked_grads = true;
        }
        for (slot, g) in acc.iter_mut().zip(grads) {
            if let Some(g) = g {
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g,
                });
            }
        }
    }
    if !loss_sum.is_finite() {
        return Err(TrainError::NonFinite {
            step: step + 1,
            loss: loss_sum as f32,
        });
    }
    let mut grads: Vec<Tensor> = acc
        .into_iter()
        .zip(opt.vars())
        .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
        .collect::<candle_core::Result<_>>()?;
    let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
    if !grad_norm.is_finite() {
        return Err(TrainError::NonFinite {
            step: step + 1,
            loss: grad_norm as f32,
        });
    }
    opt.step(&grads, lr)?;
    Ok(StepOutcome {
        loss: loss_sum,
        grad_norm,
        tokens,
        examples,
        pairs: pair_stats,
    })
}

/// Runs a recipe to the end (or to an interruption). Everything that can fail on bad input
/// (recipe, data, model, checkpoint) is checked before `output.dir` is touched. The stages:
/// inputs (model header, tokenizer, labels, data) → [`prepare_output`] → [`initial_state`] →
/// model and adapters → [`open_output`] → steps ([`optimizer_step`]) with eval, early stopping
/// and checkpoints → the final adapters and the loss plot.
pub fn train(
    recipe: &Recipe,
    opts: &TrainOptions,
    reporter: &mut dyn Reporter,
) -> Result<TrainSummary> {
    let started = Instant::now();
    let t = &recipe.train;
    let out = recipe.output.dir.clone();
    let device = runtime::device(&recipe.model.device)?;
    let dtype = runtime::dtype(&recipe.model.dtype, &device);

    // Inputs: the model's header first, then tokenizer, labels and data.
    let model_path = lorakit_models::hub::resolve(&recipe.model.path)?;
    let classify = recipe.model.task == Task::SequenceClassification;
    let base = BaseModel::open(&model_path)?.with_quantization(recipe.model.quantization());
    let tok = TextTokenizer::open(&model_path)?;
    let labels: Vec<String> = match (&recipe.data.labels, classify) {
        (Some(l), true) => l.clone(),
        (None, true) => data::scan_labels(&recipe.data.train)?,
        _ => Vec::new(),
    };
    if classify && recipe.model.num_labels.is_some_and(|n| n != labels.len()) {
        return Err(TrainError::InvalidRecipe {
            file: recipe.data.train.display().to_string(),
            field: "model.num_labels".into(),
            message: format!(
                "is {:?} but the training data has {} labels ({})",
                recipe.model.num_labels,
                labels.len(),
                labels.join(", ")
            ),
        });
    }
    let task = if classify {
        ModelTask::SequenceClassification {
            num_labels: labels.len(),
        }
    } else {
        ModelTask::CausalLm
    };
    base.check_task(task)?;
    let mut run_data = if t.objective.is_preference() {
        let (train, eval) = preference_sets(recipe, &tok)?;
        RunData::Pairs {
            train,
            eval,
            reference: None,
        }
    } else {
        let (train, eval) = datasets(recipe, &tok, &labels)?;
        // what a batch row holds: one example, or (packing) several
        let lengths: Vec<usize> = train.examples.iter().map(|e| e.ids.len()).collect();
        let rows = if recipe.data.packing {
            packing::pack(&lengths, recipe.data.max_seq_len)
        } else {
            packing::one_per_row(lengths.len())
        };
        RunData::Tokens { train, eval, rows }
    };
    let n = run_data.train_examples();
    let units = run_data.units();
    let eval_packing = recipe.data.packing.then_some(recipe.data.max_seq_len);
    let padding = match &run_data {
        RunData::Tokens { train, .. } => {
            let lengths: Vec<usize> = train.examples.iter().map(|e| e.ids.len()).collect();
            Some(padding_figures(&lengths, recipe))
        }
        RunData::Pairs { .. } => None,
    };
    let objectives = Objectives {
        preference: PreferenceLoss {
            objective: t.objective,
            beta: t.beta(),
        },
        pad_id: tok.pad_id,
        device: &device,
    };

    let plan = prepare_output(recipe, opts, &model_path)?;
    let varmap = VarMap::new();
    let (mut state, optimizer_state) = initial_state(
        recipe,
        plan.latest.as_deref(),
        units,
        &varmap,
        &device,
        reporter,
    )?;
    let dropout_seed = StepSeed::default();
    let adapters = Adapters::Train {
        config: recipe.lora.clone(),
        varmap: varmap.clone(),
        seed: t.seed,
        dropout_seed: dropout_seed.clone(),
    };
    let (model, report) = base.load(adapters, task, dtype, &device)?;
    let model = TaskModel::from(model);
    if let Some(line) = runtime::quantized_summary(&report) {
        reporter.message(&line);
    }

    // All inputs are good: now write, holding the directory's lock.
    let _lock = open_output(recipe, &plan, opts.resume.then_some(state.step), reporter)?;
    let metrics_path = out.join("metrics.jsonl");
    if tok.vocab_size() > model.vocab_size() {
        reporter.message(&format!(
            "note: the tokenizer has {} tokens, the model {}",
            tok.vocab_size(),
            model.vocab_size()
        ));
    }
    let vars: BTreeMap<String, Var> = varmap
        .data()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let trainable: usize = vars.values().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(vars, t.weight_decay)?;
    if let Some(ratio) = t.loraplus_lr_ratio {
        opt = opt.with_loraplus(ratio);
    }
    if let Some(o) = &optimizer_state {
        opt.load_state(o, state.step).map_err(TrainError::Resume)?;
    }

    // Step plan.
    let steps_per_epoch = steps_per_epoch(units, t);
    let total = t.max_steps.unwrap_or(t.epochs * steps_per_epoch);
    let warmup = t
        .warmup_steps
        .unwrap_or_else(|| (t.warmup_ratio.unwrap_or(0.0) * total as f64).round() as usize);
    reporter.message(&format!(
        "model {} ({}, {:?} on {}), {} adapted modules ({}{}), {} trainable parameters; {} train / {} eval examples ({} truncated to {} tokens); {} steps ({} per epoch)",
        recipe.model.path.display(),
        model.arch(),
        dtype,
        if device.is_cuda() { "cuda" } else { "cpu" },
        report.wrapped().count(),
        report.variant.as_ref().map(|v| v.name()).unwrap_or("lora"),
        t.loraplus_lr_ratio
            .map(|r| format!(", LoRA+ ratio {r}"))
            .unwrap_or_default(),
        trainable,
        n,
        run_data.eval_examples(),
        run_data.truncated().0 + run_data.truncated().1,
        recipe.data.max_seq_len,
        total,
        steps_per_epoch
    ));
    if let Some(padding) = padding {
        reporter.message(&format!(
            "padding: {:.1}% of the token slots of an epoch unpacked, {:.1}% packed into rows of {} tokens{}",
            100.0 * padding.unpacked,
            100.0 * padding.packed,
            recipe.data.max_seq_len,
            if recipe.data.packing {
                format!(" (packing: {n} examples in {units} rows)")
            } else {
                " (data.packing: false)".into()
            }
        ));
    }
    // the reference pass costs the same per pair in a step or up front: up front pays off when
    // the run visits every pair
    let visits = total.saturating_mul(t.batch_size * t.grad_accum_steps);
    let precompute = match t.reference_logps {
        ReferenceLogps::Precomputed => true,
        ReferenceLogps::PerStep => false,
        ReferenceLogps::Auto => visits >= units,
    };
    if let (
        RunData::Pairs {
            train, reference, ..
        },
        Objective::Dpo,
        true,
    ) = (&mut run_data, t.objective, precompute)
    {
        // the reference is fixed: its log-probabilities once per pair, not in every step
        let started = Instant::now();
        let lm = model
            .causal_lm()
            .ok_or_else(|| candle_core::Error::Msg("dpo needs a causal LM".into()))?;
        *reference = Some(preference::reference_table(
            lm,
            &train.pairs,
            tok.pad_id,
            t.batch_size,
            &device,
        )?);
        reporter.message(&format!(
            "reference log-probabilities of {} pairs (adapters off) in {:.1} s",
            train.pairs.len(),
            started.elapsed().as_secs_f64()
        ));
    }
    reporter.start(total, state.step);

    // Saving: the adapter (best / last) and checkpoints with optimizer state.
    let mut metadata: HashMap<String, String> =
        HashMap::from([("lorakit_version".into(), env!("CARGO_PKG_VERSION").into())]);
    if classify {
        // the class names in index order, for `lorakit eval` on this adapter
        metadata.insert(
            crate::LABELS_METADATA.into(),
            serde_json::to_string(&labels).unwrap_or_default(),
        );
    }
    // GPT-2's Conv1D layers: PEFT records them as `fan_in_fan_out`
    let lora = LoraConfig {
        fan_in_fan_out: model.stores_transposed(report.wrapped().map(|l| l.path.as_str())),
        ..recipe.lora.clone()
    };
    let card = crate::card::recipe_card(recipe, &model_path);
    // `figures`: the results at the moment of saving, for the card
    let save_to = |dir: &Path, figures: String| -> Result<()> {
        let mut modules = report.trained_modules(&varmap)?;
        if recipe.output.residual_form {
            // without A₀, B₀ the adapter is saved as trained, for the residual base
            modules = modules
                .into_iter()
                .map(|(m, l)| (m, l.with_initial(None)))
                .collect();
        }
        let whole = report.trained_whole(&varmap)?;
        let tmp = AtomicDir::create(dir, true)?;
        save_adapter_with(tmp.path(), &lora, &modules, &whole, &metadata)?;
        let mut card = card.clone();
        card.sections.push(("Results".into(), figures));
        card.write(tmp.path(), dir, &lora)?;
        tmp.commit()?;
        Ok(())
    };
    let save_checkpoint = |state: &TrainState, opt: &AdamW| -> Result<()> {
        let modules = report.trained_modules(&varmap)?;
        let whole = report.trained_whole(&varmap)?;
        let dir = out.join("checkpoints").join(format!("step-{}", state.step));
        checkpoint::save(
            &dir,
            &lora,
            &modules,
            &whole,
            &opt.state(),
            state,
            &metadata,
        )
    };
    // Eval: keeps the best adapter, counts evals without improvement for early stopping.
    let eval_reference: std::cell::OnceCell<Vec<(f32, f32)>> = Default::default();
    let run_eval = |state: &mut TrainState,
                    reporter: &mut dyn Reporter|
     -> Result<Option<EvalResult>> {
        let r = match &run_data {
            RunData::Tokens { eval: Some(ds), .. } => {
                evaluate(&model, ds, tok.pad_id, t.batch_size, eval_packing, &device)?
            }
            RunData::Pairs {
                eval: Some(set), ..
            } => {
                let lm = model.causal_lm().ok_or_else(|| {
                    candle_core::Error::Msg("preference tuning needs a causal LM".into())
                })?;
                // the eval pairs' reference never changes: computed at the first eval
                let table = match objectives.preference.objective {
                    Objective::Dpo => Some(match eval_reference.get() {
                        Some(table) => table,
                        None => {
                            let table = preference::reference_table(
                                lm,
                                &set.pairs,
                                tok.pad_id,
                                t.batch_size,
                                &device,
                            )?;
                            eval_reference.get_or_init(|| table)
                        }
                    }),
                    _ => None,
                };
                let m = preference::evaluate(
                    lm,
                    set,
                    objectives.preference,
                    tok.pad_id,
                    t.batch_size,
                    table.map(Vec::as_slice),
                    &device,
                )?;
                EvalResult {
                    loss: m.loss,
                    perplexity: m.loss.exp(),
                    tokens: set.pairs.len(),
                    accuracy: None,
                    preference: Some(m),
                }
            }
            _ => return Ok(None),
        };
        let best = state.best_eval_loss.is_none_or(|b| r.loss < b);
        if best {
            state.best_eval_loss = Some(r.loss);
            state.best_step = Some(state.step);
            state.evals_since_best = 0;
            let mut figures = format!(
                    "Best evaluation so far, at step {} of {total}: eval loss {:.4}, perplexity {:.3} ({} {}).",
                    state.step,
                    r.loss,
                    r.perplexity,
                    r.tokens,
                    if r.preference.is_some() { "pairs" } else { "tokens" }
                );
            if let Some(a) = r.accuracy {
                figures += &format!(" Accuracy {:.1}%.", a * 100.0);
            }
            save_to(&out.join("adapter"), figures)?;
        } else {
            state.evals_since_best += 1;
        }
        reporter.eval(state.step, &r, best);
        if let Some(p) = t.early_stopping_patience {
            if state.evals_since_best >= p {
                state.stopped_early = true;
            }
        }
        Ok(Some(r))
    };

    if state.step == 0 && plan.latest.is_none() {
        // the base model's eval loss, the yardstick for everything after
        if let Some(r) = run_eval(&mut state, reporter)? {
            metrics::append(
                &metrics_path,
                &MetricsRow {
                    step: 0,
                    epoch: 0.0,
                    loss: None,
                    lr: None,
                    tokens_per_s: None,
                    examples_per_s: None,
                    eval_loss: Some(r.loss),
                    eval_perplexity: Some(r.perplexity),
                    eval_accuracy: r.accuracy,
                    peak_rss_mb: None,
                    rewards: None,
                    eval_rewards: r.preference.map(Into::into),
                },
            )?;
        }
    }
    let mut first_loss = None;
    let mut last_loss = None;
    let mut interrupted = false;
    let mut checked_grads = false;
    'epochs: while state.step < total && !state.stopped_early {
        let order = permutation(units, t.seed.wrapping_add(state.epoch as u64));
        let micro: Vec<Vec<usize>> = order.chunks(t.batch_size).map(|c| c.to_vec()).collect();
        let groups: Vec<&[Vec<usize>]> = micro.chunks(t.grad_accum_steps).collect();
        while state.step_in_epoch < groups.len() {
            let group = groups[state.step_in_epoch];
            let step_start = Instant::now();
            let batches: Vec<Micro> = group
                .iter()
                .map(|idx| micro_batch(&run_data, idx, &objectives, model.causal_lm()))
                .collect::<Result<_>>()?;
            let lr = lr_at(t.lr_scheduler, t.learning_rate, state.step, warmup, total);
            let done = optimizer_step(
                &model,
                &mut opt,
                &batches,
                &objectives,
                t,
                state.step,
                lr,
                &dropout_seed,
                &mut checked_grads,
            )?;
            state.step += 1;
            state.step_in_epoch += 1;
            first_loss.get_or_insert(done.loss);
            last_loss = Some(done.loss);
            let secs = step_start.elapsed().as_secs_f64().max(1e-9);
            let (tps, eps) = (done.tokens as f64 / secs, done.examples as f64 / secs);
            let epoch_f = state.epoch as f64 + state.step_in_epoch as f64 / groups.len() as f64;
            reporter.step(&StepReport {
                step: state.step,
                total,
                epoch: epoch_f,
                loss: done.loss,
                lr,
                tokens_per_s: tps,
                examples_per_s: eps,
                grad_norm: done.grad_norm,
                rewards: done.pairs.map(|p| p.means()),
            });
            let epoch_done = state.step_in_epoch == groups.len();
            if epoch_done {
                state.epoch += 1;
                state.step_in_epoch = 0;
            }
            let mut row = MetricsRow {
                step: state.step,
                epoch: epoch_f,
                loss: Some(done.loss),
                lr: Some(lr),
                tokens_per_s: Some(tps),
                examples_per_s: Some(eps),
                eval_loss: None,
                eval_perplexity: None,
                eval_accuracy: None,
                peak_rss_mb: runtime::peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0)),
                rewards: done.pairs.map(|p| p.means().into()),
                eval_rewards: None,
            };
            if t.eval_every.is_some_and(|e| state.step.is_multiple_of(e))
                || epoch_done
                || state.step == total
            {
                if let Some(r) = run_eval(&mut state, reporter)? {
                    row.eval_loss = Some(r.loss);
                    row.eval_perplexity = Some(r.perplexity);
                    row.eval_accuracy = r.accuracy;
                    row.eval_rewards = r.preference.map(Into::into);
                }
            }
            if state.step.is_multiple_of(t.log_every)
                || state.step == total
                || row.eval_loss.is_some()
            {
                metrics::append(&metrics_path, &row)?;
            }
            if t.save_every.is_some_and(|s| state.step.is_multiple_of(s)) {
                save_checkpoint(&state, &opt)?;
            }
            if opts.stop.load(Ordering::SeqCst) {
                save_checkpoint(&state, &opt)?;
                interrupted = true;
                break 'epochs;
            }
            if state.step >= total || state.stopped_early {
                break 'epochs;
            }
            if epoch_done {
                break;
            }
        }
    }

    // Finish: last checkpoint and adapters, the loss plot, the summary.
    if !interrupted {
        save_checkpoint(&state, &opt)?;
        let mut figures = format!("After all {} steps", state.step);
        if let Some(l) = last_loss {
            figures += &format!(": training loss {l:.4} (last step)");
        }
        if let (Some(s), Some(l)) = (state.best_step, state.best_eval_loss) {
            figures += &format!("; best eval loss {l:.4} at step {s} (the `adapter` directory)");
        }
        figures += ".";
        save_to(&out.join("last"), figures.clone())?;
        if !run_data.has_eval() {
            save_to(&out.join("adapter"), figures)?;
        }
    }
    let rows = metrics::read(&metrics_path);
    lorakit_adapter::fsutil::atomic_write(
        &out.join("loss.svg"),
        metrics::loss_svg(&rows).as_bytes(),
    )?;
    // A resumed run reports the losses of the whole run, not only of its own steps.
    let first_loss = rows.iter().find_map(|r| r.loss).or(first_loss);
    reporter.finish();
    let adapter_dir = out.join("adapter");
    Ok(TrainSummary {
        steps: state.step,
        total_steps: total,
        seconds: started.elapsed().as_secs_f64(),
        first_loss,
        last_loss,
        best_eval: state.best_step.zip(state.best_eval_loss),
        adapter_bytes: dir_bytes(&adapter_dir),
        adapter_dir,
        interrupted,
        stopped_early: state.stopped_early,
        train_examples: n,
        eval_examples: run_data.eval_examples(),
        truncated: run_data.truncated().0,
        padding,
        peak_rss_bytes: runtime::peak_rss_bytes(),
    })
}

/// The micro-batch of units `idx`: rows of examples, or pairs with their reference
/// log-probabilities (precomputed, or computed now with the adapters off for `per_step`).
fn micro_batch<'a>(
    data: &'a RunData,
    idx: &[usize],
    objectives: &Objectives,
    lm: Option<&dyn lorakit_models::CausalLm>,
) -> Result<Micro<'a>> {
    Ok(match data {
        RunData::Tokens { train, rows, .. } => {
            let batch_rows: Vec<Vec<_>> = idx
                .iter()
                .map(|r| rows[*r].iter().map(|i| &train.examples[*i]).collect())
                .collect();
            Micro::Tokens(Batch::packed(
                &batch_rows,
                objectives.pad_id,
                objectives.device,
            )?)
        }
        RunData::Pairs {
            train, reference, ..
        } => {
            let pairs: Vec<&Pair> = idx.iter().map(|i| &train.pairs[*i]).collect();
            let reference = match (objectives.preference.objective, reference) {
                (Objective::Dpo, Some(table)) => {
                    Some(preference::reference_rows(table, idx, objectives.device)?)
                }
                (Objective::Dpo, None) => {
                    let lm =
                        lm.ok_or_else(|| candle_core::Error::Msg("dpo needs a causal LM".into()))?;
                    Some(preference::reference_logps(
                        lm,
                        &pairs,
                        objectives.pad_id,
                        objectives.device,
                    )?)
                }
                _ => None,
            };
            Micro::Pairs { pairs, reference }
        }
    })
}

/// The padding share of the first epoch's batches of `lengths`, unpacked and packed, whichever
/// the recipe trains with: what packing saves on this data.
fn padding_figures(lengths: &[usize], recipe: &Recipe) -> Padding {
    let t = &recipe.train;
    let of = |rows: Vec<packing::Row>| {
        let order = permutation(rows.len(), t.seed);
        let shuffled: Vec<packing::Row> = order.iter().map(|i| rows[*i].clone()).collect();
        let batches: Vec<&[packing::Row]> = shuffled.chunks(t.batch_size.max(1)).collect();
        packing::padding_fraction(&batches, lengths)
    };
    Padding {
        unpacked: of(packing::one_per_row(lengths.len())),
        packed: of(packing::pack(lengths, recipe.data.max_seq_len)),
    }
}
