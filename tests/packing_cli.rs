//! `data.packing` and `lorakit eval --packing` through the binary: a packed run reports its
//! padding and examples/s, resumes byte-identically, and its adapter's eval loss is the same
//! packed or not; packing a classifier's data is refused.
mod common;
use common::{copy_dir, lorakit, text};
use std::path::Path;

fn train(out: &Path, extra: &[&str]) -> String {
    let dir = format!("output.dir={}", out.display());
    let mut args = vec![
        "train",
        "recipes/tiny-instruction.yaml",
        "--set",
        &dir,
        "--set",
        "data.packing=true",
        "--set",
        "data.max_seq_len=160",
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_every=2",
        "--set",
        "train.batch_size=2",
        "--set",
        "train.grad_accum_steps=1",
    ];
    args.extend(extra);
    let o = lorakit(&args);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    stdout
}

fn eval_loss(adapter: &Path, packing: bool) -> (f64, u64) {
    let a = adapter.display().to_string();
    let mut args = vec![
        "eval",
        "--model",
        "examples/tiny-llama",
        "--data",
        "examples/data/capitals-instruction-train.jsonl",
        "--format",
        "instruction",
        "--max-seq-len",
        "160",
        "--adapter",
        &a,
        "--json",
    ];
    if packing {
        args.push("--packing");
    }
    let o = lorakit(&args);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
}

#[test]
fn a_packed_run_reports_padding_resumes_exactly_and_evaluates_the_same_packed_or_not() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let stdout = train(&full, &[]);
    // 26 training examples of about 50 tokens: three to a row of 160
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("padding:")).collect();
    let packed_into = rows
        .iter()
        .find_map(|l| l.split("packing: 26 examples in ").nth(1))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no packing line: {stdout}"));
    assert!(packed_into <= 10, "{packed_into} rows: {stdout}");
    let percent = |l: &str, after: &str| -> f64 {
        let at = l.find(after).unwrap() + after.len();
        l[at..]
            .trim_start()
            .split('%')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let summary = rows.last().unwrap();
    let (packed, unpacked) = (
        percent(summary, "padding:"),
        percent(summary, "slots packed ("),
    );
    // both shares are reported (on these similar-length examples packing gains little)
    for p in [packed, unpacked] {
        assert!((0.0..50.0).contains(&p), "{summary}");
    }

    let metrics = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    let stepped: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["loss"].is_number())
        .collect();
    assert!(!stepped.is_empty());
    for v in &stepped {
        let (tps, eps) = (
            v["tokens_per_s"].as_f64().unwrap(),
            v["examples_per_s"].as_f64().unwrap(),
        );
        // real tokens only: no example has more than 64
        assert!(eps > 0.0 && tps / eps < 64.0, "{v}");
    }

    // the interrupted twin: the run as it was after its step-2 checkpoint
    let part = tmp.path().join("part");
    copy_dir(&full, &part);
    for gone in [
        "checkpoints/step-4",
        "checkpoints/step-6",
        "adapter",
        "last",
    ] {
        std::fs::remove_dir_all(part.join(gone)).unwrap();
    }
    train(&part, &["--resume"]);
    for f in [
        "last/adapter_model.safetensors",
        "checkpoints/step-6/optimizer.safetensors",
    ] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(part.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }

    let (plain, tokens) = eval_loss(&full.join("last"), false);
    let (packed, packed_tokens) = eval_loss(&full.join("last"), true);
    assert_eq!(tokens, packed_tokens);
    assert!(
        (plain - packed).abs() <= 1e-5,
        "eval loss {plain} unpacked, {packed} packed"
    );
}

#[test]
fn packing_a_classifiers_data_is_refused() {
    let o = lorakit(&[
        "train",
        "recipes/minilm-sentiment.yaml",
        "--set",
        "data.packing=true",
        "--set",
        "data.train=examples/data/capitals-train.jsonl",
        "--set",
        "data.eval=examples/data/capitals-eval.jsonl",
    ]);
    let (_, stderr) = text(&o);
    assert!(!o.status.success());
    assert!(
        stderr.contains("data.packing") && stderr.contains("sequence_classification"),
        "{stderr}"
    );
}
