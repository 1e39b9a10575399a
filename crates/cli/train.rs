//! `lorakit train RECIPE.yaml [--set key=value ...] [--resume]`.
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lorakit_train::eval::EvalResult;
use lorakit_train::{train, Recipe, Reporter, StepReport, TrainOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// The YAML recipe (see README: Recipes).
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. --set train.learning_rate=1e-4 (repeatable; values are YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in output.dir.
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Start over: delete an existing output.dir first — only a run directory lorakit made, never
    /// one that is, holds or lies inside the model, the data or this recipe.
    #[arg(long)]
    pub force: bool,
}

/// A progress bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    /// The first failed write to stdout, reported when training returns.
    write_error: Option<std::io::Error>,
}

impl Progress {
    fn line(&mut self, text: &str) {
        use std::io::Write as _;
        match &self.bar {
            Some(b) => b.println(text),
            None => {
                if let Err(e) = writeln!(std::io::stdout(), "{text}") {
                    self.write_error.get_or_insert(e);
                }
            }
        }
    }
}

impl Reporter for Progress {
    fn start(&mut self, total: usize, resumed_at: usize) {
        if std::io::stdout().is_terminal() {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(resumed_at as u64);
            self.bar = Some(bar);
        }
    }
    fn message(&mut self, text: &str) {
        self.line(text);
    }
    fn step(&mut self, r: &StepReport) {
        let mut line = format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s  {:.1} ex/s",
            r.loss, r.lr, r.tokens_per_s, r.examples_per_s
        );
        if let Some(p) = &r.rewards {
            line.push_str(&format!(
                "  reward accuracy {:.2}  margin {:.4}",
                p.reward_accuracy, p.reward_margin
            ));
        }
        match &self.bar {
            Some(b) => {
                b.set_position(r.step as u64);
                b.set_message(line);
            }
            None => self.line(&format!(
                "step {}/{}  epoch {:.2}  {line}  grad-norm {:.3}",
                r.step, r.total, r.epoch, r.grad_norm
            )),
        }
    }
    fn eval(&mut self, step: usize, r: &EvalResult, best: bool) {
        let what = match (r.accuracy, &r.preference) {
            (_, Some(p)) => format!(
                "reward accuracy {:.4}  margin {:.4}  chosen {:.4}  rejected {:.4}  ({} pairs)",
                p.reward_accuracy, p.reward_margin, p.rewards_chosen, p.rewards_rejected, r.tokens
            ),
            (Some(a), None) => format!("accuracy {a:.4}  ({} examples)", r.tokens),
            (None, None) => format!("perplexity {:.2}  ({} tokens)", r.perplexity, r.tokens),
        };
        self.message(&format!(
            "eval at step {step}: loss {:.4}  {what}{}",
            r.loss,
            if best {
                "  new best, saved to adapter/"
            } else {
                ""
            }
        ));
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

pub fn run(args: Args) -> Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // First Ctrl-C: finish the step, checkpoint, exit. A second one ends at once.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        crate::note("\ninterrupt: finishing the current step and saving a checkpoint (Ctrl-C again to quit now)");
    });
    let mut progress = Progress {
        bar: None,
        write_error: None,
    };
    let s = train(
        &recipe,
        &TrainOptions {
            resume: args.resume,
            force: args.force,
            recipe_file: Some(args.recipe.clone()),
            stop,
        },
        &mut progress,
    )
    .with_context(|| format!("training with {}", args.recipe.display()))?;
    if let Some(e) = progress.write_error {
        anyhow::bail!("writing to standard output: {e}");
    }
    let out = &recipe.output.dir;
    if s.interrupted {
        say!(
            "stopped at step {}/{}; checkpoint saved in {}/checkpoints/step-{}. Resume with:\n  lorakit train {} --resume{}",
            s.steps,
            s.total_steps,
            out.display(),
            s.steps,
            args.recipe.display(),
            args.set.iter().map(|k| format!(" --set {k}")).collect::<String>()
        );
        return Ok(ExitCode::from(130));
    }
    say!(
        "done: {} steps in {:.1} s{}",
        s.steps,
        s.seconds,
        if s.stopped_early {
            " (early stopping)"
        } else {
            ""
        }
    );
    if let (Some(a), Some(b)) = (s.first_loss, s.last_loss) {
        say!("  train loss {a:.4} -> {b:.4}");
    }
    if let Some(p) = s.padding {
        let packing = recipe.data.packing;
        let (this, other) = if packing {
            (p.packed, p.unpacked)
        } else {
            (p.unpacked, p.packed)
        };
        say!(
            "  padding: {:.1}% of token slots{} ({:.1}% {})",
            100.0 * this,
            if packing { " packed" } else { "" },
            100.0 * other,
            if packing {
                "unpacked"
            } else {
                "with data.packing: true"
            },
        );
    }
    match s.best_eval {
        Some((step, loss)) if recipe.train.objective.is_preference() => say!(
            "  best eval loss ({}) {loss:.4} at step {step}",
            recipe.train.objective.name()
        ),
        Some((step, loss)) => say!(
            "  best eval loss {loss:.4} (perplexity {:.2}) at step {step}",
            loss.exp()
        ),
        None => say!("  no eval data: adapter/ holds the final weights"),
    }
    say!(
        "  adapter: {} ({:.1} KB, PEFT format); final weights in {}/last",
        s.adapter_dir.display(),
        s.adapter_bytes as f64 / 1024.0,
        out.display()
    );
    if let Some(peak) = s.peak_rss_bytes {
        say!(
            "  peak memory: {:.0} MB resident",
            peak as f64 / (1024.0 * 1024.0)
        );
    }
    say!(
        "  metrics: {}/metrics.jsonl, plot: {}/loss.svg",
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
