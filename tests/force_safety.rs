//! `--force` never loses a user's files: it replaces only a directory lorakit made, never one
//! that is, holds or lies inside an input of the same command, never the current directory; a
//! failed `merge --verify` leaves the old output in place; racing writers cannot both win. Each
//! refusal is checked to leave every file of the scratch tree byte-identical.
mod common;

use common::{copy_dir, root};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Every file under `dir` (relative path -> bytes), links as their targets' names.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &p, out);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, target.display().to_string().into_bytes());
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A user's project folder: recipe.yaml, base/, data/, notes.txt.
struct Project {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Project {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("project");
        copy_dir(&root().join("examples/tiny-llama"), &dir.join("base"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::copy(
            root().join("examples/data/capitals-train.jsonl"),
            dir.join("data/train.jsonl"),
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "my notes\n").unwrap();
        let p = Project { _tmp: tmp, dir };
        p.recipe("out");
        p
    }

    /// Writes recipe.yaml (paths relative to the project) with `output.dir: out_dir`.
    fn recipe(&self, out_dir: &str) {
        std::fs::write(
            self.dir.join("recipe.yaml"),
            format!(
                "model:\n  path: base\ndata:\n  train: data/train.jsonl\n  format: completion\n  max_seq_len: 32\nlora:\n  r: 4\n  target_modules: [q_proj]\ntrain:\n  max_steps: 1\n  batch_size: 4\noutput:\n  dir: {out_dir}\n"
            ),
        )
        .unwrap();
    }

    fn lorakit(&self, args: &[&str]) -> Output {
        lorakit_in(&self.dir, args)
    }
}

fn lorakit_in(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}

/// Runs a command that must be refused, and checks the refusal and that `tree` is unchanged.
fn refused(name: &str, cwd: &Path, tree: &Path, args: &[&str], expect: &[&str]) {
    let before = snapshot(tree);
    let o = lorakit_in(cwd, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "[{name}] {err}");
    assert!(err.starts_with("error: "), "[{name}] {err}");
    assert!(
        !err.contains("panicked") && err.trim_end().lines().count() == 1,
        "[{name}] not one line: {err}"
    );
    for e in expect {
        assert!(err.contains(e), "[{name}] expected {e:?} in: {err}");
    }
    let after = snapshot(tree);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "[{name}] files appeared or vanished"
    );
    assert!(before == after, "[{name}] a file changed");
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn train_force_never_deletes_its_inputs_or_a_foreign_directory() {
    let p = Project::new();
    let d = p.dir.to_str().unwrap();
    // output.dir is the project folder itself: it holds the model, the data and the recipe
    p.recipe(d);
    refused(
        "output.dir = project",
        &p.dir,
        &p.dir,
        &["train", "recipe.yaml", "--force"],
        &["--force", "contains the", "project"],
    );
    // output.dir: . (also the current directory)
    p.recipe(".");
    refused(
        "output.dir = .",
        &p.dir,
        &p.dir,
        &["train", "recipe.yaml", "--force"],
        &["--force", "contains the"],
    );
    // the recipe lives elsewhere: the model and data inside the output still protect it
    let elsewhere = p.dir.parent().unwrap().join("elsewhere.yaml");
    std::fs::copy(p.dir.join("recipe.yaml"), &elsewhere).unwrap();
    refused(
        "recipe outside, output = cwd with inputs",
        &p.dir,
        p.dir.parent().unwrap(),
        &["train", elsewhere.to_str().unwrap(), "--force"],
        &["contains the"],
    );
    // the output lies inside the model directory
    std::fs::create_dir(p.dir.join("base/run")).unwrap();
    std::fs::write(p.dir.join("base/run/x"), "x").unwrap();
    p.recipe("base/run");
    refused(
        "output inside the model",
        &p.dir,
        &p.dir,
        &["train", "recipe.yaml", "--force"],
        &["base/run", "lies inside the model", "base"],
    );
    std::fs::remove_dir_all(p.dir.join("base/run")).unwrap();
    // a folder whose recipe.yaml is anybody's, holding no input: not lorakit's, not deleted
    let foreign = p.dir.join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("recipe.yaml"), "hello: world\n").unwrap();
    std::fs::write(foreign.join("thesis.tex"), "chapter 1\n").unwrap();
    p.recipe("foreign");
    refused(
        "foreign dir holding a recipe.yaml",
        &p.dir,
        &p.dir,
        &["train", "recipe.yaml", "--force"],
        &["foreign", ".lorakit-output.json", "did not make it"],
    );
    // the current directory, reached as a parent of it
    std::fs::create_dir_all(p.dir.join("foreign/sub")).unwrap();
    let inner = p.dir.join("foreign/sub");
    let rec = p.dir.parent().unwrap().join("cwd.yaml");
    std::fs::write(
        &rec,
        std::fs::read_to_string(p.dir.join("recipe.yaml"))
            .unwrap()
            .replace("path: base", &format!("path: {d}/base"))
            .replace("train: data", &format!("train: {d}/data"))
            .replace("dir: foreign", "dir: .."),
    )
    .unwrap();
    std::fs::write(
        p.dir.join("foreign/.lorakit-output.json"),
        "{\"lorakit\": \"train\"}",
    )
    .unwrap();
    refused(
        "output contains the current directory",
        &inner,
        &p.dir,
        &["train", rec.to_str().unwrap(), "--force"],
        &["current directory"],
    );

    // a run lorakit made is replaced; the user's files beside it stay
    p.recipe("runs/a");
    ok(&p.lorakit(&["train", "recipe.yaml"]));
    assert!(p.dir.join("runs/a/.lorakit-output.json").is_file());
    std::fs::write(p.dir.join("runs/a/stale.txt"), "old").unwrap();
    let outside = snapshot(&p.dir.join("base"));
    ok(&p.lorakit(&["train", "recipe.yaml", "--force"]));
    assert!(!p.dir.join("runs/a/stale.txt").exists());
    assert!(p.dir.join("runs/a/adapter/adapter_config.json").is_file());
    assert!(snapshot(&p.dir.join("base")) == outside);
    assert_eq!(
        std::fs::read_to_string(p.dir.join("notes.txt")).unwrap(),
        "my notes\n"
    );
    // nothing left beside the run (the old one was moved aside, then removed)
    let beside: Vec<_> = std::fs::read_dir(p.dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    // the run's own saved recipe is an input when used: --force will not delete it
    refused(
        "recipe inside the run",
        &p.dir,
        &p.dir,
        &["train", "runs/a/recipe.yaml", "--force"],
        &["contains the recipe", "runs/a/recipe.yaml"],
    );
}

#[test]
fn merge_and_convert_force_never_delete_their_inputs() {
    let p = Project::new();
    let fixture = root().join("tests/fixtures/peft/llama_gqa");
    copy_dir(&fixture.join("base"), &p.dir.join("gqa"));
    copy_dir(&fixture.join("adapters/all_f32"), &p.dir.join("adapter"));
    let merge = |out: &str| {
        vec![
            "merge".to_string(),
            "--base".into(),
            "gqa".into(),
            "--adapter".into(),
            "adapter".into(),
            "--out".into(),
            out.into(),
            "--force".into(),
        ]
    };
    let run = |name: &str, args: Vec<String>, expect: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(name, &p.dir, &p.dir, &a, expect);
    };
    run(
        "merge --out adapter",
        merge("adapter"),
        &["will not replace adapter", "it is the adapter adapter"],
    );
    run(
        "merge --out base",
        merge("gqa"),
        &["will not replace gqa", "it is the base model gqa"],
    );
    run(
        "merge --out project",
        merge("."),
        &["contains the base model gqa"],
    );
    // an earlier merge kept inside the adapter's folder, replaced with --force: it lies inside
    // an input
    let nested = p.dir.join("adapter/merged");
    std::fs::create_dir(&nested).unwrap();
    std::fs::write(
        nested.join(".lorakit-output.json"),
        "{\"lorakit\": \"merge\"}",
    )
    .unwrap();
    std::fs::write(nested.join("x"), "x").unwrap();
    run(
        "merge --out inside the adapter",
        merge("adapter/merged"),
        &["lies inside the adapter adapter"],
    );
    std::fs::remove_dir_all(&nested).unwrap();
    // a folder of the user's
    std::fs::create_dir(p.dir.join("mine")).unwrap();
    std::fs::write(p.dir.join("mine/keep.txt"), "keep").unwrap();
    run(
        "merge --out a user folder",
        merge("mine"),
        &["will not replace mine", ".lorakit-output.json"],
    );

    // convert: the GGUF inside the output folder (refused before the file is even read)
    std::fs::create_dir(p.dir.join("ggufs")).unwrap();
    std::fs::write(p.dir.join("ggufs/m.gguf"), b"GGUF not really").unwrap();
    std::fs::write(p.dir.join("ggufs/other.txt"), "other").unwrap();
    std::fs::write(
        p.dir.join("ggufs/.lorakit-output.json"),
        "{\"lorakit\": \"convert\"}",
    )
    .unwrap();
    run(
        "convert --out the GGUF's folder",
        vec![
            "convert".into(),
            "ggufs/m.gguf".into(),
            "--out".into(),
            "ggufs".into(),
            "--force".into(),
        ],
        &[
            "will not replace ggufs",
            "contains the GGUF model ggufs/m.gguf",
        ],
    );
    run(
        "convert --out the GGUF itself",
        vec![
            "convert".into(),
            "ggufs/m.gguf".into(),
            "--out".into(),
            "ggufs/m.gguf".into(),
            "--force".into(),
        ],
        &["it is the GGUF model"],
    );

    // a merge lorakit made is replaced by the next one
    let out = p.dir.join("merged");
    ok(&p.lorakit(&[
        "merge",
        "--base",
        "gqa",
        "--adapter",
        "adapter",
        "--out",
        "merged",
    ]));
    assert!(out.join(".lorakit-output.json").is_file());
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    ok(&p.lorakit(
        &merge("merged")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    ));
    assert!(!out.join("stale.txt").exists() && out.join("model.safetensors").is_file());
}

#[test]
fn a_failed_merge_verify_leaves_the_old_output_in_place() {
    let p = Project::new();
    let fixture = root().join("tests/fixtures/peft/llama_gqa");
    copy_dir(&fixture.join("base"), &p.dir.join("gqa"));
    copy_dir(&fixture.join("adapters/all_f32"), &p.dir.join("adapter"));
    ok(&p.lorakit(&[
        "merge",
        "--base",
        "gqa",
        "--adapter",
        "adapter",
        "--out",
        "merged",
    ]));
    // an adapter scaled so far up that the model's logits overflow: the merged weights are
    // finite, so the merge itself succeeds, and --verify must catch it
    copy_dir(&p.dir.join("adapter"), &p.dir.join("loud"));
    let cfg_path = p.dir.join("loud/adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = 1e30.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let before = snapshot(&p.dir.join("merged"));
    let o = p.lorakit(&[
        "merge",
        "--base",
        "gqa",
        "--adapter",
        "loud",
        "--out",
        "merged",
        "--force",
        "--dtype",
        "f32",
        "--verify",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}{err}");
    assert!(
        err.contains("verification failed") && err.contains("merged was left as it was"),
        "{err}"
    );
    assert!(!stdout.contains("wrote"), "{stdout}");
    assert!(snapshot(&p.dir.join("merged")) == before, "merged/ changed");
    let beside: Vec<_> = std::fs::read_dir(&p.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(beside.is_empty(), "temporary files left: {beside:?}");
}

#[test]
fn racing_merges_into_one_new_output_cannot_all_win() {
    let p = Project::new();
    let fixture = root().join("tests/fixtures/peft/llama_gqa");
    let base = fixture.join("base");
    let adapter = fixture.join("adapters/all_f32");
    let out = p.dir.join("merged");
    let children: Vec<_> = (0..3)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_lorakit"))
                .args(["merge", "--base"])
                .arg(&base)
                .arg("--adapter")
                .arg(&adapter)
                .arg("--out")
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let results: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = results.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one merge may create the output");
    for o in results.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("merged") && err.contains("--force"), "{err}");
    }
    assert!(out.join("model.safetensors").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&p.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
