//! `lorakit generate` through the binary: an adapter applied unmerged generates exactly the
//! tokens the merged model generates; seeds reproduce samples; chat templates apply.
mod common;
use common::{lorakit_ok as lorakit, root};

#[test]
fn adapter_and_merged_model_generate_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let model = root().join("examples/tiny-llama");
    let adapter = root().join("tests/fixtures/trained/lorakit_adapter");
    let merged = tmp.path().join("merged");
    let (m, a, g) = (
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        merged.to_str().unwrap(),
    );
    lorakit(&["merge", "--base", m, "--adapter", a, "--out", g]);
    for prompt in ["The capital of France is", "The capital of Peru"] {
        let common = [
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
            "--device",
            "cpu",
        ];
        let with_adapter =
            lorakit(&[&["generate", "--model", m, "--adapter", a], &common[..]].concat());
        let with_merged = lorakit(&[&["generate", "--model", g], &common[..]].concat());
        let base = lorakit(&[&["generate", "--model", m], &common[..]].concat());
        assert!(!with_adapter.trim().is_empty());
        assert_eq!(with_adapter, with_merged, "{prompt}");
        // the adapter changes what the model says (so the equality above means something)
        assert_ne!(with_adapter, base, "{prompt}");
    }
}

#[test]
fn sampling_is_reproducible_by_seed_and_chat_uses_the_template() {
    let m = root().join("examples/tiny-llama");
    let m = m.to_str().unwrap();
    let sample = |seed: &str| {
        lorakit(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "The capital",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "24",
        ])
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    let chat = lorakit(&[
        "generate",
        "--model",
        m,
        "--chat",
        "What is the capital of Peru?",
        "--max-new-tokens",
        "8",
    ]);
    let raw = lorakit(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "What is the capital of Peru?",
        "--max-new-tokens",
        "8",
    ]);
    assert_ne!(chat, raw, "the chat template must change the prompt");
}
