//! Data parsing and tokenisation in every causal-LM format (completion, instruction, chat, and
//! preference pairs), with the tiny example model's tokenizer and chat template. First byte:
//! format (low two bits) and `train_on_inputs` (bit 2).
#![no_main]
use libfuzzer_sys::fuzz_target;
use lorakit_train::{data, preference, DataFormat, TextTokenizer};
use std::path::Path;
use std::sync::OnceLock;

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-llama");
        TextTokenizer::from_model_dir(&dir).expect("the example tokenizer loads")
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Some((&head, rest)) = bytes.split_first() else {
        return;
    };
    if head & 3 == 3 {
        let path = Path::new("fuzz.jsonl");
        if let Ok(set) = preference::parse(rest.to_vec(), path, tokenizer(), 64) {
            for p in &set.pairs {
                assert!(!p.prompt.is_empty() && !p.chosen.is_empty() && !p.rejected.is_empty());
                assert!(p.prompt.len() + p.chosen.len().max(p.rejected.len()) <= 64);
            }
        }
        return;
    }
    let format = [
        DataFormat::Completion,
        DataFormat::Instruction,
        DataFormat::Chat,
    ][head as usize & 3];
    if let Ok(ds) = data::parse(
        rest.to_vec(),
        Path::new("fuzz.jsonl"),
        format,
        tokenizer(),
        64,
        head & 4 != 0,
    ) {
        for ex in &ds.examples {
            assert_eq!(ex.ids.len(), ex.targets.len());
            assert!(ex.ids.len() <= 64);
        }
    }
});
