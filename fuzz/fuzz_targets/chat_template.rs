//! Chat templates come with downloaded models: any template text, rendered over any
//! conversation, must give text or an error, never a panic, and within bounded work (the
//! renderer's fuel) and output. The input is the template, a NUL byte, then the conversation
//! as JSON (a `messages` array); without a NUL the conversation is a fixed two-turn one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use lorakit_train::data::ChatTemplate;
use lorakit_train::TextTokenizer;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-llama");
        TextTokenizer::from_model_dir(&dir).expect("the example tokenizer loads")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let (source, conversation) = match bytes.iter().position(|b| *b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &b""[..]),
    };
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let messages: Vec<serde_json::Value> = serde_json::from_slice(conversation)
        .ok()
        .and_then(|v: serde_json::Value| v.as_array().cloned())
        .unwrap_or_else(|| {
            vec![
                serde_json::json!({"role": "user", "content": "Capital of France?"}),
                serde_json::json!({"role": "assistant", "content": "Paris"}),
            ]
        });
    let Ok(t) = ChatTemplate::from_source(source.to_string(), Path::new("fuzz.jinja")) else {
        return;
    };
    let start = Instant::now();
    for generation_prompt in [false, true] {
        if let Ok(text) = t.render(&messages, tokenizer(), generation_prompt) {
            assert!(text.len() <= 64 << 20, "output past the bound");
        }
    }
    // the fuel bound: a few seconds even on a slow, instrumented fuzzing build
    assert!(start.elapsed() < Duration::from_secs(20), "rendering ran unbounded");
});
