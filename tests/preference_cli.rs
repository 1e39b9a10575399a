//! Preference tuning through the binary: `data.format: preference` with `train.objective: dpo`
//! starts at ln 2 (the adapter is zero, so the policy is the reference), learns a preference
//! that holds on held-out pairs, resumes exactly, and `lorakit eval --format preference` reports
//! the run's own figures; ORPO trains too; the reference computed per step gives what the
//! precomputed one gives.
mod common;
use common::{lorakit, text};
use std::path::Path;

const LN2: f64 = std::f64::consts::LN_2;

fn recipe(dir: &Path, objective: &str, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "model:\n  path: examples/tiny-llama\ndata:\n  train: examples/data/capitals-preference-train.jsonl\n  eval: examples/data/capitals-preference-eval.jsonl\n  format: preference\n  max_seq_len: 64\n\
lora:\n  r: 8\n  lora_alpha: 16\n  target_modules: all-linear\ntrain:\n  objective: {objective}\n  max_steps: 24\n  batch_size: 4\n  grad_accum_steps: 2\n  learning_rate: 3.0e-3\n  warmup_steps: 2\n  eval_every: 12\n  save_every: 6\n  seed: 5\n{extra}output:\n  dir: {}\n",
        dir.join("run").display()
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn train(recipe: &Path, extra: &[&str]) -> String {
    let r = recipe.display().to_string();
    let mut args = vec!["train", r.as_str()];
    args.extend(extra);
    let o = lorakit(&args);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    stdout
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The run's last eval row.
fn last_eval(rows: &[serde_json::Value]) -> &serde_json::Value {
    rows.iter()
        .rev()
        .find(|v| v["eval_loss"].is_number())
        .expect("an eval row")
}

fn eval_pairs(adapter: &Path, objective: &str) -> serde_json::Value {
    let a = adapter.display().to_string();
    let o = lorakit(&[
        "eval",
        "--model",
        "examples/tiny-llama",
        "--adapter",
        &a,
        "--data",
        "examples/data/capitals-preference-eval.jsonl",
        "--format",
        "preference",
        "--objective",
        objective,
        "--max-seq-len",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn dpo_starts_at_ln2_learns_a_held_out_preference_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "dpo", "");
    let stdout = train(&r, &[]);
    assert!(
        stdout.contains("reference log-probabilities of 32 pairs"),
        "{stdout}"
    );
    let run = tmp.path().join("run");
    let rows = metrics(&run);
    // before any update: the zero adapter makes the policy the reference
    let first_eval = &rows[0];
    assert!(
        (first_eval["eval_loss"].as_f64().unwrap() - LN2).abs() < 1e-6,
        "{first_eval}"
    );
    assert_eq!(first_eval["eval_reward_accuracy"].as_f64(), Some(0.0));
    let step1 = rows.iter().find(|v| v["step"] == 1).unwrap();
    assert!(
        (step1["loss"].as_f64().unwrap() - LN2).abs() < 1e-6,
        "{step1}"
    );
    assert!(
        step1["reward_margin"].as_f64().unwrap().abs() < 1e-6,
        "{step1}"
    );
    // after training: held-out pairs prefer the chosen answer
    let last = last_eval(&rows);
    assert!(
        last["eval_reward_accuracy"].as_f64().unwrap() >= 0.75,
        "{last}"
    );
    assert!(last["eval_reward_margin"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["eval_loss"].as_f64().unwrap() < LN2, "{last}");

    // `lorakit eval` of the final adapter reports the run's last eval
    let e = eval_pairs(&run.join("last"), "dpo");
    for (k, m) in [
        ("loss", "eval_loss"),
        ("reward_accuracy", "eval_reward_accuracy"),
        ("reward_margin", "eval_reward_margin"),
    ] {
        let (got, want) = (e[k].as_f64().unwrap(), last[m].as_f64().unwrap());
        assert!((got - want).abs() < 1e-5, "{k}: eval {got}, run {want}");
    }

    // resumed from the step-12 checkpoint: the same final adapter and figures
    let final_adapter = std::fs::read(run.join("last/adapter_model.safetensors")).unwrap();
    for gone in [
        "checkpoints/step-18",
        "checkpoints/step-24",
        "adapter",
        "last",
    ] {
        std::fs::remove_dir_all(run.join(gone)).unwrap();
    }
    train(&r, &["--resume"]);
    assert!(
        std::fs::read(run.join("last/adapter_model.safetensors")).unwrap() == final_adapter,
        "the resumed run ends with another adapter"
    );
    let resumed = metrics(&run);
    let resumed_last = last_eval(&resumed);
    for k in [
        "step",
        "loss",
        "eval_loss",
        "eval_reward_margin",
        "rewards_chosen",
    ] {
        assert_eq!(resumed_last[k], last[k], "resume changed {k}");
    }
}

#[test]
fn the_reference_per_step_gives_the_precomputed_run_and_orpo_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let mut losses = Vec::new();
    for (name, extra) in [
        ("pre", "  reference_logps: precomputed\n"),
        ("per", "  reference_logps: per_step\n"),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        train(&recipe(&dir, "dpo", extra), &["--set", "train.max_steps=6"]);
        losses.push(
            metrics(&dir.join("run"))
                .into_iter()
                .filter_map(|v| v["loss"].as_f64())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(losses[0].len(), 6);
    for (a, b) in losses[0].iter().zip(&losses[1]) {
        assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", losses[0], losses[1]);
    }

    // auto: a run that visits fewer pairs than the data holds computes the reference per step
    let dir = tmp.path().join("auto");
    std::fs::create_dir_all(&dir).unwrap();
    let stdout = train(&recipe(&dir, "dpo", ""), &["--set", "train.max_steps=2"]);
    assert!(!stdout.contains("reference log-probabilities"), "{stdout}");

    let dir = tmp.path().join("orpo");
    std::fs::create_dir_all(&dir).unwrap();
    let stdout = train(&recipe(&dir, "orpo", "  beta: 0.2\n"), &[]);
    assert!(!stdout.contains("reference log-probabilities"), "{stdout}");
    let rows = metrics(&dir.join("run"));
    let losses: Vec<f64> = rows.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert!(losses.last().unwrap() < &(losses[0] * 0.8), "{losses:?}");
    let last = last_eval(&rows);
    assert!(
        last["eval_reward_accuracy"].as_f64().unwrap() >= 0.75,
        "{last}"
    );
    let e = eval_pairs(&dir.join("run/last"), "orpo");
    assert_eq!(e["objective"], "orpo");
    assert!(e["reward_margin"].as_f64().unwrap() > 0.0, "{e}");
}

#[test]
fn preference_recipes_and_data_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe(tmp.path(), "sft", "");
    let o = lorakit(&["train", r.to_str().unwrap()]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("train.objective") && stderr.contains("dpo or orpo"),
        "{stderr}"
    );

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"chosen\": \" b\", \"rejected\": \" c\"}\n{\"prompt\": \"a\", \"chosen\": \" b\"}\n",
    )
    .unwrap();
    let r = recipe(tmp.path(), "dpo", "");
    let set = format!("data.train={}", bad.display());
    let o = lorakit(&["train", r.to_str().unwrap(), "--set", &set]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("bad.jsonl:2") && stderr.contains("\"rejected\""),
        "{stderr}"
    );
    assert!(
        !tmp.path().join("run").exists(),
        "a refused run wrote its output"
    );
}
