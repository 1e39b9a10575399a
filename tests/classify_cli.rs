//! Sequence classification end to end on the tiny BERT fixture: `lorakit train` with
//! `task: sequence_classification` learns a separable task, saves a PEFT SEQ_CLS adapter (LoRA on
//! query/value + the `classifier` as modules_to_save, under PEFT's key names), and `lorakit eval`
//! on that adapter reproduces the trainer's accuracy.
mod common;
use common::{lorakit, root};

/// Seeded sentences: a sentiment word among fillers; the label follows the sentiment word.
fn data(n: usize, seed: u64) -> String {
    let pos = [
        "good",
        "great",
        "fun",
        "superb",
        "lovely",
        "wonderful",
        "brilliant",
        "charming",
    ];
    let neg = [
        "bad", "awful", "dull", "boring", "terrible", "poor", "weak", "tedious",
    ];
    let fill = [
        "the", "movie", "film", "was", "very", "plot", "acting", "really", "this", "story",
    ];
    let mut x = seed;
    let mut next = |m: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % m
    };
    let mut out = String::new();
    for i in 0..n {
        let positive = i % 2 == 0;
        let w = if positive {
            pos[next(pos.len())]
        } else {
            neg[next(neg.len())]
        };
        let mut words: Vec<&str> = (0..3).map(|_| fill[next(fill.len())]).collect();
        words.insert(next(4), w);
        let label = if positive { "positive" } else { "negative" };
        out += &format!(
            "{{\"text\": \"{}\", \"label\": \"{label}\"}}\n",
            words.join(" ")
        );
    }
    out
}

#[test]
fn bert_classifier_trains_saves_peft_seq_cls_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("train.jsonl"), data(192, 1)).unwrap();
    std::fs::write(d.join("eval.jsonl"), data(32, 2)).unwrap();
    let base = root().join("tests/fixtures/peft/bert_seq_cls/base");
    let weights_before = std::fs::read(base.join("model.safetensors")).unwrap();
    let recipe = format!(
        "model:\n  path: {b}\n  task: sequence_classification\ndata:\n  train: {d}/train.jsonl\n  eval: {d}/eval.jsonl\n  format: classification\n  max_seq_len: 16\nlora:\n  r: 8\n  lora_alpha: 16\n  target_modules: [query, key, value, dense]\ntrain:\n  max_steps: 160\n  batch_size: 16\n  learning_rate: 5.0e-3\n  eval_every: 40\noutput:\n  dir: {d}/out\n",
        b = base.display(),
        d = d.display()
    );
    std::fs::write(d.join("recipe.yaml"), recipe).unwrap();
    let o = lorakit(&["train", d.join("recipe.yaml").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // the eval accuracy rose from chance to (near) perfect
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(d.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let accs: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["eval_accuracy"].as_f64())
        .collect();
    assert!(accs.len() >= 3, "{rows:?}");
    let (first, best) = (accs[0], accs.iter().cloned().fold(0.0, f64::max));
    assert!(first < 0.8 && best >= 0.9, "eval accuracy {accs:?}");

    // PEFT SEQ_CLS layout: LoRA on query/value, the head saved whole under PEFT's key names
    let adapter = d.join("out/adapter");
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));
    let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let want: Vec<serde_json::Value> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(root().join("tests/fixtures/peft/bert_seq_cls/expected.json"))
            .unwrap(),
    )
    .unwrap()["adapter_keys"]
        .as_array()
        .unwrap()
        .clone();
    let want: Vec<&str> = want.iter().map(|v| v.as_str().unwrap()).collect();
    // PEFT's adapter targets query/value only; ours adds key and the dense layers
    let ours_qv: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.contains(".query.") || n.contains(".value.") || n.contains("classifier"))
        .collect();
    assert_eq!(ours_qv, want, "the key names PEFT uses");
    assert!(names
        .iter()
        .any(|n| n.ends_with("attention.self.key.lora_A.weight")));
    assert_eq!(
        st.tensor("base_model.model.classifier.weight")
            .unwrap()
            .shape(),
        &[2, 32]
    );

    // lorakit eval on the saved adapter: the trainer's accuracy, label names from the adapter
    let o = lorakit(&[
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        d.join("eval.jsonl").to_str().unwrap(),
        "--format",
        "classification",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let best_row = rows
        .iter()
        .filter(|r| r["eval_loss"].is_number())
        .min_by(|a, b| {
            a["eval_loss"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["eval_loss"].as_f64().unwrap())
        })
        .unwrap();
    assert!(
        (r["accuracy"].as_f64().unwrap() - best_row["eval_accuracy"].as_f64().unwrap()).abs()
            < 1e-9,
        "{r} vs {best_row}"
    );
    assert!((r["loss"].as_f64().unwrap() - best_row["eval_loss"].as_f64().unwrap()).abs() < 1e-4);
    assert_eq!(r["labels"], serde_json::json!(["negative", "positive"]));
    // the base weights were not touched
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        weights_before
    );
}

/// Every command opens a BERT directory through the same model registry as a decoder: `inspect`
/// walks its modules, and a recipe asking a BERT model for a task it is not built for is refused
/// before anything is written.
#[test]
fn bert_goes_through_the_shared_model_interface() {
    let base = root().join("tests/fixtures/peft/bert_seq_cls/base");
    let b = base.to_str().unwrap();
    let out = common::lorakit_ok(&["inspect", b]);
    assert!(out.contains("architecture: bert (2 layers"), "{out}");
    assert!(
        out.contains("bert.encoder.layer.1.attention.self.query    [32, 32] +bias"),
        "{out}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("train.jsonl"),
        "{\"text\": \"good movie\"}\n{\"text\": \"bad movie\"}\n",
    )
    .unwrap();
    let recipe = d.join("recipe.yaml");
    std::fs::write(
        &recipe,
        format!(
            "model:\n  path: {b}\ndata:\n  train: {t}\n  format: completion\ntrain:\n  max_steps: 1\noutput:\n  dir: {o}\n",
            t = d.join("train.jsonl").display(),
            o = d.join("out").display()
        ),
    )
    .unwrap();
    let o = lorakit(&["train", recipe.to_str().unwrap()]);
    let (_, err) = common::text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("config.json")
            && err.contains("\"bert\" models are built for sequence_classification, not causal_lm"),
        "{err}"
    );
    assert!(!d.join("out").exists());
}
