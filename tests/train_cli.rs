//! End-to-end: `lorakit train` and `lorakit eval` through the binary on the committed tiny model.
mod common;
use common::{lorakit, root, skipped, text as out_err};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn every_committed_recipe_parses() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("recipes")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains(".cache/lorakit") && !root().join(".cache/lorakit/sentiment").is_dir()
            {
                skipped(&format!(
                    "{} needs the real data: run `bash scripts/fetch-real.sh`",
                    path.display()
                ));
                continue;
            }
            // paths in recipes are relative to the repository root
            let cwd = std::env::current_dir().unwrap();
            std::env::set_current_dir(root()).unwrap();
            let r = lorakit_train::Recipe::load(&path, &[]);
            std::env::set_current_dir(cwd).unwrap();
            r.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} recipes");
}

#[test]
fn train_writes_a_peft_adapter_metrics_and_a_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &format!("output.dir={}", p(&out)),
        "--set",
        "train.max_steps=30",
    ]);
    let (stdout, stderr) = out_err(&o);
    assert!(o.status.success(), "{stderr}");
    // plain lines when stdout is not a terminal, then the summary
    assert!(
        stdout.contains("step 1/30") && stdout.contains("step 30/30"),
        "{stdout}"
    );
    assert!(
        stdout.contains("eval at step 0:") && stdout.contains("best eval loss"),
        "{stdout}"
    );
    assert!(
        stdout.contains("adapter: ") && stdout.contains("KB, PEFT format"),
        "{stdout}"
    );
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "last/adapter_model.safetensors",
        "metrics.jsonl",
        "recipe.yaml",
        "loss.svg",
        "checkpoints/step-30/state.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 8);
    assert_eq!(cfg["base_model_name_or_path"], "examples/tiny-llama");
    // the model card: Hub front matter, the data file's sha256, the figures at saving time
    let card = std::fs::read_to_string(out.join("adapter/README.md")).unwrap();
    let front = card
        .strip_prefix("---\n")
        .unwrap()
        .split("\n---\n")
        .next()
        .unwrap();
    assert!(
        front.contains("base_model: examples/tiny-llama") && front.contains("library_name: peft"),
        "{card}"
    );
    let recipe = std::fs::read_to_string(root().join("recipes/tiny-completion.yaml")).unwrap();
    let train_file = recipe
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("train: ")
                .filter(|f| f.ends_with(".jsonl"))
        })
        .map(|f| root().join(f.trim()))
        .unwrap();
    let sha = lorakit_train::card::sha256_file(&train_file).unwrap();
    assert!(
        card.contains(&sha) && card.contains("Best evaluation so far"),
        "{card}"
    );
    assert!(std::fs::read_to_string(out.join("last/README.md"))
        .unwrap()
        .contains("After all 30 steps"));
    // the adapter applies to the base: inspect-able and mergeable
    let merged = tmp.path().join("merged");
    let o = lorakit(&[
        "merge",
        "--base",
        "examples/tiny-llama",
        "--adapter",
        p(&out.join("adapter")),
        "--out",
        p(&merged),
        "--verify",
    ]);
    assert!(o.status.success(), "{}", out_err(&o).1);
    assert!(merged.join("tokenizer.json").is_file());

    // eval: the same loss the trainer reported for its best adapter
    let o = lorakit(&[
        "eval",
        "--model",
        "examples/tiny-llama",
        "--adapter",
        p(&out.join("adapter")),
        "--data",
        "examples/data/capitals-eval.jsonl",
        "--max-seq-len",
        "64",
        "--json",
    ]);
    assert!(o.status.success(), "{}", out_err(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9 * loss.exp());
    let best: f64 = stdout
        .split("best eval loss ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (loss - best).abs() < 1e-3,
        "eval {loss} vs trainer's best {best}"
    );
    // without the adapter: same tokens, higher loss
    let o = lorakit(&[
        "eval",
        "--model",
        "examples/tiny-llama",
        "--data",
        "examples/data/capitals-eval.jsonl",
        "--max-seq-len",
        "64",
        "--json",
    ]);
    let base: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(base["tokens"], v["tokens"]);
    assert!(base["loss"].as_f64().unwrap() > loss + 0.5);
}

#[test]
fn ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let part = tmp.path().join("part");
    let set = |d: &Path| format!("output.dir={}", p(d));
    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &set(&full),
        "--set",
        "train.max_steps=60",
    ]);
    assert!(o.status.success(), "{}", out_err(&o).1);

    // The signal races the run: should the run finish first, start it over (at most a few
    // times) rather than skip the resume half, which is what this test is for.
    let mut interrupted = None;
    for attempt in 0..5 {
        let child = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .current_dir(root())
            .args([
                "train",
                "recipes/tiny-completion.yaml",
                "--set",
                &set(&part),
                "--set",
                "train.max_steps=60",
                "--set",
                "train.log_every=1",
                "--force",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // interrupt once a few steps are logged (fewer on each retry)
        let rows = 4usize.saturating_sub(attempt).max(2);
        let start = Instant::now();
        while std::fs::read_to_string(part.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .count()
            < rows
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "training did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        if !o.status.success() {
            interrupted = Some(o);
            break;
        }
        eprintln!("attempt {attempt}: the run finished before SIGINT landed; starting over");
    }
    let o = interrupted.expect("SIGINT never landed before the run finished (5 attempts)");
    let (stdout, stderr) = out_err(&o);
    assert_eq!(o.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("--resume") && stdout.contains("checkpoint saved"),
        "{stdout}"
    );
    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &set(&part),
        "--set",
        "train.max_steps=60",
        "--set",
        "train.log_every=1",
        "--resume",
    ]);
    assert!(o.status.success(), "{}", out_err(&o).1);
    for f in [
        "last/adapter_model.safetensors",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(part.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
}

#[test]
fn recipe_mistakes_are_clean_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    let text = std::fs::read_to_string(root().join("recipes/tiny-completion.yaml"))
        .unwrap()
        .replace("learning_rate:", "learnig_rate:");
    std::fs::write(&bad, text).unwrap();
    let o = lorakit(&["train", p(&bad)]);
    let (_, err) = out_err(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.yaml")
            && err.contains("train.learnig_rate")
            && err.contains("did you mean learning_rate?")
            && err.contains("line 22"),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        "train.learning_rate=-1",
    ]);
    let (_, err) = out_err(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("train.learning_rate") && err.contains("positive"),
        "{err}"
    );

    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        "data.train=missing.jsonl",
    ]);
    let (_, err) = out_err(&o);
    assert!(
        err.contains("data.train") && err.contains("missing.jsonl"),
        "{err}"
    );

    let o = lorakit(&[
        "eval",
        "--model",
        "examples/tiny-llama",
        "--data",
        "nowhere.jsonl",
    ]);
    let (_, err) = out_err(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("nowhere.jsonl"), "{err}");
}

#[test]
fn divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = lorakit(&[
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        &format!("output.dir={}", p(&out)),
        "--set",
        "train.learning_rate=1e30",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.save_every=1",
    ]);
    let (_, err) = out_err(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("diverged at step") && err.contains("NaN") && !err.contains("panicked"),
        "{err}"
    );
    // the checkpoint before the bad step is intact and resumable state
    let step: usize = err
        .split("diverged at step ")
        .nth(1)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let good = out.join(format!("checkpoints/step-{}", step - 1));
    assert!(good.join("state.json").is_file() && good.join("adapter_model.safetensors").is_file());
    assert!(!out.join(format!("checkpoints/step-{step}")).exists());
}
