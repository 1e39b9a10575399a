//! kill -9 at arbitrary moments during `lorakit train`, then `--resume`: the final adapters are
//! byte-identical to an uninterrupted run. Also: one writer per output directory, and a killed
//! run's stale lock is taken over.
mod common;
use common::root;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: &str = "train.max_steps=48";

fn args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "recipes/tiny-completion.yaml",
        "--set",
        STEPS,
        "--set",
        "train.save_every=3",
        "--set",
        "train.eval_every=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("--set".into());
    v.push(format!("output.dir={out}"));
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(root())
        .args(args(out.to_str().unwrap(), extra))
        .output()
        .unwrap()
}

fn spawn(out: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(root())
        .args(args(out.to_str().unwrap(), &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn logged_steps(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .count()
}

fn wait_for(mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn kill_9_then_resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let o = run(&full, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let mut interrupted = 0;
    for (i, kill_after) in [2usize, 9, 17, 30].into_iter().enumerate() {
        let out = tmp.path().join(format!("killed-{i}"));
        let mut child = spawn(&out);
        wait_for(|| logged_steps(&out) >= kill_after || child.try_wait().unwrap().is_some());
        // vary the moment within the step too
        std::thread::sleep(Duration::from_micros(700 * i as u64));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            continue; // finished before the kill landed
        }
        interrupted += 1;
        // resuming needs a checkpoint; before the first one there is nothing to resume
        let resumable = out
            .join("checkpoints")
            .read_dir()
            .map(|mut d| d.any(|e| e.unwrap().path().join("state.json").is_file()))
            .unwrap_or(false);
        eprintln!(
            "killed after {} logged rows; resumable: {resumable}",
            logged_steps(&out)
        );
        let o = if resumable {
            run(&out, &["--resume"])
        } else {
            run(&out, &["--force"])
        };
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "kill after {kill_after} steps: {err}");
        let stdout = String::from_utf8_lossy(&o.stdout);
        if resumable {
            assert!(
                stdout.contains("stale lock"),
                "the killed run's lock was not reported: {stdout}"
            );
        }
        for f in [
            "last/adapter_model.safetensors",
            "adapter/adapter_model.safetensors",
            "checkpoints/step-48/optimizer.safetensors",
        ] {
            assert!(
                std::fs::read(full.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
                "kill after {kill_after}: {f} differs"
            );
        }
        assert_eq!(
            logged_steps(&full),
            logged_steps(&out),
            "kill after {kill_after}: metrics rows differ"
        );
        // no temporary leftovers
        for d in [out.clone(), out.join("checkpoints")] {
            for e in std::fs::read_dir(&d).unwrap() {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with('.') || name == ".lorakit-output.json",
                    "leftover {name} in {}",
                    d.display()
                );
            }
        }
    }
    assert!(
        interrupted >= 2,
        "only {interrupted} runs were actually killed"
    );
}

#[test]
fn a_second_writer_is_refused_while_the_first_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut first = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(root())
        .args([
            "train",
            "recipes/tiny-completion.yaml",
            "--set",
            "train.max_steps=100000",
            "--set",
        ])
        .arg(format!("output.dir={}", out.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| logged_steps(&out) >= 2);
    for extra in [&["--resume"][..], &["--force"][..]] {
        let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
            .current_dir(root())
            .args(["train", "recipes/tiny-completion.yaml", "--set"])
            .arg(format!("output.dir={}", out.display()))
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("in use by another lorakit train")
                && err.contains(&first.id().to_string()),
            "{err}"
        );
    }
    let _ = first.kill();
    first.wait().unwrap();
    assert!(
        out.join("metrics.jsonl").is_file(),
        "the refused runs must not have deleted the first run's files"
    );
}
